"""The Nova fault proxy (vmha.lab.nova.faults) against a small HTTP server standing in for nova-api;
tests/integration/nova/test_nova_api_faults.py puts it in front of the real one."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vmha.lab.nova.faults import ACTION, Fault, FaultProxy, parse_spec


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Upstream.seen.append((self.command, self.path, body))
        data = json.dumps({"got": body.decode(), "token": self.headers.get("X-Auth-Token")}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Openstack-Request-Id", "req-1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    _Upstream.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2.1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def call(proxy: FaultProxy, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    host, port = proxy.url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body or None, {"X-Auth-Token": "admin:admin"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_first_requests_of_a_rule_and_the_answer_lost_after_forwarding(upstream: str) -> None:
    rules = [Fault(429, "POST", ACTION, first=1, retry_after=7), Fault(503, "POST", ACTION, first=1),
             Fault(502, "POST", ACTION, first=1)]  # fmt: skip
    with FaultProxy(upstream, rules) as proxy:
        assert proxy.url.endswith("/v2.1")
        code, headers, body = call(proxy, "POST", "/v2.1/servers/abc/action", b'{"evacuate": {}}')
        assert (code, headers["Retry-After"], json.loads(body)["overLimit"]["code"]) == (429, "7", 429)
        assert call(proxy, "GET", "/v2.1/servers/abc")[0] == 202  # another path: forwarded
        assert call(proxy, "POST", "/v2.1/servers/abc/action", b"x")[0] == 503
        assert _Upstream.seen == [("GET", "/v2.1/servers/abc", b"")]  # neither fault reached the API
        assert call(proxy, "POST", "/v2.1/servers/abc/action", b'{"evacuate": {}}')[0] == 502
        # 502: the API got the request and acted, its answer was replaced.
        assert _Upstream.seen[-1] == ("POST", "/v2.1/servers/abc/action", b'{"evacuate": {}}')
        code, headers, body = call(proxy, "POST", "/v2.1/servers/abc/action", b"again")
        assert (code, headers["X-Openstack-Request-Id"], json.loads(body)) == (
            202, "req-1", {"got": "again", "token": "admin:admin"})  # fmt: skip
        assert [(m, c, f) for m, _, c, f in proxy.answers] == [
            ("POST", 429, False), ("GET", 202, True), ("POST", 503, False), ("POST", 502, True), ("POST", 202, True)]


def test_seeded_fractions_add_up_and_repeat(upstream: str) -> None:
    def codes(seed: int) -> list[int]:
        with FaultProxy(upstream, parse_spec("429:0.2,503:0.1"), seed=seed) as proxy:
            return [call(proxy, "GET", f"/v2.1/servers/{i}")[0] for i in range(200)]

    first = codes(1)
    assert first == codes(1)
    assert 25 < first.count(429) < 55 and 8 < first.count(503) < 35 and first.count(202) > 120
    # The version document (openstacksdk's discovery) is never faulted by a spec.
    with FaultProxy(upstream, parse_spec("503:1.0")) as proxy:
        assert call(proxy, "GET", "/v2.1/")[0] == 202
        assert call(proxy, "GET", "/v2.1/servers")[0] == 503


@pytest.mark.parametrize("spec", ["404:0.1", "429", "429:x", "429:1.5", "429:0.6,503:0.5"])
def test_bad_specs_are_refused_naming_the_part(spec: str) -> None:
    with pytest.raises(ValueError, match="api fault"):
        parse_spec(spec)


def test_target_must_be_an_http_url() -> None:
    with pytest.raises(ValueError, match="target must be http"):
        FaultProxy("nova:8774", [])
