"""LAB / TEST ONLY: an HTTP proxy in front of nova-api that answers some requests with API faults.

    proxy = FaultProxy(rig.nova_url, [Fault(429, "POST", ACTION, first=1), Fault(503, "POST", ACTION, first=1)])
    proxy.start()
    conn = nova.connect(**(rig.connect_options() | {"compute_endpoint_override": proxy.url}))
    proxy.answers       # [(method, path, code, forwarded)], one per request
    proxy.set_rules([...])  # other faults from now on
    proxy.close()

Per request the first rule that matches (method, path regex) and fires decides:
- 429 (with Retry-After) and 503: answered here, Nova never sees the request (a rate limiter, an
  overloaded load balancer);
- 502: forwarded, Nova acts, and its answer is replaced (lost on the way back: the dangerous case).
A rule fires for the first `first` requests that reach it, or for a seeded `fraction` of them. The
fractions of the rules a request matches add up over one draw: "429:0.2,503:0.1" answers 20 % of the
requests 429 and 10 % 503. No rule fires: forwarded as it is.

Threads (http.server), not asyncio: openstacksdk blocks in threads of the caller's loop, and the
bench and the tests use the proxy alike.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# The server actions (evacuate, os-resetState, os-start...): POST /v2.1/servers/<id>/action.
ACTION = r"/servers/[^/]+/action$"
# Everything below the API's version document: the version discovery itself is left alone.
API_CALLS = r"^/v2\.1/."
CODES = (429, 502, 503)
RETRY_AFTER = 1  # s, the Retry-After of a 429 (Nova's old rate limiter answered whole seconds)
# Hop-by-hop headers, and the length the proxy sets itself.
_NOT_RELAYED = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length",
                          "upgrade", "te", "trailer"})


@dataclass(frozen=True, slots=True)
class Fault:
    code: int  # one of CODES
    method: str = ""  # "" any
    path: str = ""  # regex searched in the request path; "" any
    first: int = 0  # fires for the first `first` requests reaching the rule...
    fraction: float = 0.0  # ...else for this fraction of them
    retry_after: int = RETRY_AFTER  # s, the Retry-After header of a 429

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"fault code must be one of {CODES}, got {self.code}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fault fraction must be between 0 and 1, got {self.fraction}")

    def matches(self, method: str, path: str) -> bool:
        return (not self.method or self.method == method) and re.search(self.path, path) is not None


def parse_spec(spec: str) -> list[Fault]:
    """`429:0.2,503:0.1` -> rules for that fraction of every API call (version discovery excepted)."""
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        code, sep, fraction = part.partition(":")
        try:
            rules.append(Fault(int(code), path=API_CALLS, fraction=float(fraction)))
        except ValueError as e:
            raise ValueError(f"api fault {part!r}: expected CODE:FRACTION, CODE one of {CODES}: {e}") from None
        if not sep:
            raise ValueError(f"api fault {part!r}: expected CODE:FRACTION")
    if sum(r.fraction for r in rules) > 1.0:
        raise ValueError(f"api faults {spec!r}: the fractions add up to more than 1")
    return rules


class FaultProxy:
    def __init__(self, target: str, rules: list[Fault], seed: int = 0, listen: str = "127.0.0.1") -> None:
        parts = urlsplit(target)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"FaultProxy: target must be http://host:port[/path], got {target!r}")
        self.target = (parts.hostname, parts.port)
        self.base = parts.path.rstrip("/")  # kept in url: the proxy stands where the API did
        self.rules = rules
        self._reached = [0] * len(rules)  # requests that reached each rule
        self.answers: list[tuple[str, str, int, bool]] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server((listen, 0), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self.base}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="nova-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def set_rules(self, rules: list[Fault]) -> None:
        """New rules from now on (a test's faults after some request went through), counted afresh."""
        with self._lock:
            self.rules, self._reached = rules, [0] * len(rules)

    def decide(self, method: str, path: str) -> Fault | None:
        """The rule answering this request, or None: forward it as it is."""
        with self._lock:
            draw, share = self._random.random(), 0.0
            for i, rule in enumerate(self.rules):
                if not rule.matches(method, path):
                    continue
                self._reached[i] += 1
                share += rule.fraction
                if self._reached[i] <= rule.first or draw < share:
                    return rule
            return None

    def record(self, method: str, path: str, code: int, forwarded: bool) -> None:
        with self._lock:
            self.answers.append((method, path, code, forwarded))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    protocol_version = "HTTP/1.1"  # keep-alive, as openstacksdk's session expects
    timeout = 60  # an idle kept-alive connection ends its thread

    def relay(self) -> None:
        proxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        rule = proxy.decide(self.command, self.path)
        fault = None if rule is None else rule.code
        if rule is not None and rule.code != 502:
            proxy.record(self.command, self.path, rule.code, False)
            retry_after = [("Retry-After", str(rule.retry_after))] if rule.code == 429 else []
            self.answer(rule.code, retry_after, _fault_body(rule.code))
            return
        upstream = http.client.HTTPConnection(*proxy.target, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_RELAYED}
            upstream.request(self.command, self.path, body or None, headers)
            resp = upstream.getresponse()
            data = resp.read()
        except OSError:
            proxy.record(self.command, self.path, 502, False)
            self.answer(502, [], _fault_body(502))
            return
        finally:
            upstream.close()
        proxy.record(self.command, self.path, fault or resp.status, True)
        if fault == 502:
            self.answer(502, [], _fault_body(502))  # Nova acted; its answer is lost
        else:
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _NOT_RELAYED]
            self.answer(resp.status, kept, data)

    def answer(self, code: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = relay

    def log_message(self, format: str, *args: object) -> None:
        pass  # answers are in FaultProxy.answers


def _fault_body(code: int) -> bytes:
    """A body as Nova's own faults have it ({"<kind>": {"code", "message"}}), for openstacksdk's message."""
    kind, message = {
        429: ("overLimit", "This request was rate-limited (fault proxy)."),
        502: ("badGateway", "The answer was lost on its way back (fault proxy)."),
        503: ("serviceUnavailable", "The API is overloaded (fault proxy)."),
    }[code]
    return json.dumps({kind: {"code": code, "message": message}}).encode()


__all__ = ["ACTION", "API_CALLS", "Fault", "FaultProxy", "parse_spec"]
