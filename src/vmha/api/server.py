"""The manager's REST API and dashboard over HTTPS (aiohttp), bearer tokens from [api] tokens_file.

    GET  /                              the dashboard (static page; it asks for a token)
    GET  /openapi.json                  the OpenAPI document of everything below
    GET  /metrics                       the manager's Prometheus metrics (vmha.metrics.MANAGER)
    GET  /v1/hosts | vms | tasks | policy | pause | events?last=N | recoveries/{vm}
    GET  /v1/stream                     server-sent events: "event" (a decision or alert), "change"
    POST /v1/hosts/{host}/enable        admin
    POST /v1/hosts/{host}/maintenance   admin, {"on": true|false}
    POST /v1/pause                      admin, {"on": true|false, "why": "..."}

Every manager serves it, leader or standby: reads come from etcd, and each action is an etcd write
the leader watches (vmha.manager.operations, shared with the CLI), so whichever manager answers, the
leader acts. No token: 401; a read-only token on an action: 403. /metrics needs a token too (Prometheus:
`authorization: {credentials_file: ...}`); the [metrics] listener serves the same registry without one.
With [api.keystone], a Keystone token in X-Auth-Token works too (vmha.api.keystone): invalid 401, no
vmha role 403, Keystone down 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vmha import metrics
from vmha.api import views
from vmha.api.auth import Role, Tokens
from vmha.api.keystone import KeystoneDenied, KeystoneTokens, KeystoneUnavailable
from vmha.config import ApiConfig, Config
from vmha.drivers.base import DriverError
from vmha.etcd.client import EtcdClient, EtcdError
from vmha.etcd.keys import Keys
from vmha.etcd.records import EventLog
from vmha.etcd.watch import watch_prefix
from vmha.manager import operations

log = logging.getLogger("vmha.api")

MAX_EVENTS = 5000
MAX_BODY = 16 * 1024
SSE_PING = 15.0  # seconds between keep-alive comments on an idle stream
SSE_QUEUE = 512  # messages a slow stream may lag behind before it is closed (the page reconnects)
STOP_TIMEOUT = 5.0  # seconds the watches get to end when the API stops

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CLIENT = web.AppKey("client", EtcdClient)
_KEYS = web.AppKey("keys", Keys)
_CFG = web.AppKey("cfg", Config)
_TOKENS = web.AppKey("tokens", Tokens)
_KEYSTONE = web.AppKey("keystone", object)
_VMS = web.AppKey("vms", object)
_HUB = web.AppKey("hub", object)


def _static(name: str) -> bytes:
    return resources.files("vmha.api").joinpath("static", name).read_bytes()


class Hub:
    """One set of etcd watches for every stream: each decision-stream entry goes out as an "event",
    each change under the keys the dashboard shows as a "change" naming what changed."""

    WATCHED = ("health", "fabric", "tasks", "maintenance", "disabled", "quarantined", "pause")

    def __init__(self, client: EtcdClient, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.subscribers: set[asyncio.Queue[tuple[str, str] | None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        prefixes = {"health": self.keys.health_prefix, "fabric": self.keys.fabric_prefix,
                    "tasks": self.keys.tasks_prefix, "maintenance": self.keys.maintenance_prefix,
                    "disabled": self.keys.disabled_prefix, "quarantined": self.keys.quarantined_prefix,
                    "pause": self.keys.pause}  # fmt: skip
        self._tasks = [asyncio.create_task(self._changes(what, prefixes[what]), name=f"api watch {what}")
                       for what in self.WATCHED]  # fmt: skip
        self._tasks.append(asyncio.create_task(self._events(), name="api watch events"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        # Bounded: a watch stuck in aetcd must not hang the manager's shutdown with it.
        _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
        for t in stuck:
            log.warning("api: %s did not end within %.0f s of its cancellation; left behind", t.get_name(),
                        STOP_TIMEOUT)
        for q in list(self.subscribers):
            self._close(q)

    def _close(self, q: asyncio.Queue[tuple[str, str] | None]) -> None:
        """End that stream: None, its last message, in room made for it if need be."""
        self.subscribers.discard(q)
        if q.full():
            q.get_nowait()
        q.put_nowait(None)

    def _send(self, kind: str, data: dict[str, Any]) -> None:
        message = (kind, json.dumps(data, sort_keys=True))
        for q in list(self.subscribers):
            try:
                q.put_nowait(message)
            except asyncio.QueueFull:  # too slow: closed, its page reconnects and reloads
                self._close(q)

    async def _changes(self, what: str, prefix: str) -> None:
        async for _ in watch_prefix(self.client, prefix):
            self._send("change", {"what": what})

    async def _events(self) -> None:
        log_ = EventLog(self.client, self.keys)
        while True:
            try:
                revision = await self.client.revision()
            except EtcdError as e:
                log.warning("api: event stream: etcd: %s; retrying", e)
                await self.client.wait_backoff()
                continue
            async for ev in log_.follow(revision):
                self._send("event", ev.to_dict())

    @contextlib.contextmanager
    def subscribe(self) -> Any:
        q: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(SSE_QUEUE)
        self.subscribers.add(q)
        try:
            yield q
        finally:
            self.subscribers.discard(q)


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


@web.middleware
async def _auth_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/") and request.path != "/metrics":
        return await handler(request)  # the dashboard page and the OpenAPI document: no data in them
    role = request.app[_TOKENS].role(request.headers.get("Authorization"))
    keystone: KeystoneTokens | None = request.app[_KEYSTONE]  # type: ignore[assignment]
    subject = request.headers.get("X-Auth-Token")
    if role is None and keystone is not None and subject is not None:
        try:
            role = await keystone.role(subject)
        except KeystoneDenied as e:
            return _error(e.status, str(e))
        except KeystoneUnavailable as e:
            return _error(503, str(e))
    if role is None:
        return web.json_response({"error": "a bearer token is required"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="vmha"'})
    if request.method != "GET" and role != Role.ADMIN:
        return _error(403, f"{request.method} {request.path}: needs an admin token (this one is {role.value})")
    try:
        return await handler(request)
    except EtcdError as e:
        return _error(503, f"etcd: {e}")
    except DriverError as e:
        return _error(503, f"compute driver: {e}")
    except operations.OperationError as e:
        return _error(404 if e.not_found else 409, str(e))


async def _body(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    """The JSON object of a request with exactly these typed fields (those of type str optional)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    try:
        body = json.loads(await request.content.read(MAX_BODY + 1) or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="the body is not JSON") from None
    if not isinstance(body, dict) or set(body) - set(fields):
        raise web.HTTPBadRequest(text=f"expected a JSON object with fields {', '.join(fields)}")
    for name, kind in fields.items():
        if name not in body and kind is str:
            body[name] = ""
        elif not isinstance(body.get(name), kind):
            raise web.HTTPBadRequest(text=f"field {name!r}: expected {kind.__name__}")
    return body


def _by(request: web.Request) -> str:
    return f"api from {request.remote or 'unknown'}"


async def _dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_static("index.html"), content_type="text/html",
                        headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 "script-src 'self' 'unsafe-inline'", "Cache-Control": "no-cache"})  # fmt: skip


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=_static("openapi.json"), content_type="application/json")


async def _hosts(request: web.Request) -> web.Response:
    return web.json_response(await views.hosts(request.app[_CLIENT], request.app[_KEYS]))


async def _vms(request: web.Request) -> web.Response:
    lister: views.VmLister | None = request.app[_VMS]  # type: ignore[assignment]
    return web.json_response(await views.vms(lister))


async def _tasks(request: web.Request) -> web.Response:
    return web.json_response(await views.tasks(request.app[_CLIENT], request.app[_KEYS]))


async def _recoveries(request: web.Request) -> web.Response:
    vm = request.match_info["vm"]
    return web.json_response(await views.recoveries(request.app[_CLIENT], request.app[_KEYS], vm))


async def _events(request: web.Request) -> web.Response:
    try:
        last = int(request.query.get("last", "100"))
    except ValueError:
        raise web.HTTPBadRequest(text="last: expected an integer") from None
    if not 0 <= last <= MAX_EVENTS:
        raise web.HTTPBadRequest(text=f"last: between 0 and {MAX_EVENTS}")
    return web.json_response(await views.events(request.app[_CLIENT], request.app[_KEYS], last))


async def _policy(request: web.Request) -> web.Response:
    return web.json_response(views.policy(request.app[_CFG]))


async def _pause_get(request: web.Request) -> web.Response:
    return web.json_response(await views.pause_state(request.app[_CLIENT], request.app[_KEYS]))


async def _stream(request: web.Request) -> web.StreamResponse:
    hub: Hub = request.app[_HUB]  # type: ignore[assignment]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    with hub.subscribe() as q, contextlib.suppress(ConnectionResetError):  # the page went away
        await resp.write(b": vmha stream\n\n")
        while True:
            try:
                message = await asyncio.wait_for(q.get(), SSE_PING)
            except TimeoutError:
                await resp.write(b": ping\n\n")
                continue
            if message is None:
                break
            kind, data = message
            await resp.write(f"event: {kind}\ndata: {data}\n\n".encode())
    return resp


async def _enable(request: web.Request) -> web.Response:
    host = request.match_info["host"]
    a = request.app
    leader = await operations.host_enable(a[_CFG], a[_CLIENT], a[_KEYS], host, by=_by(request))
    return web.json_response({"host": host, "enabled": True, "leader": leader})


async def _maintenance(request: web.Request) -> web.Response:
    host = request.match_info["host"]
    body = await _body(request, {"on": bool})
    leader = await operations.host_maintenance(request.app[_CLIENT], request.app[_KEYS], host, body["on"],
                                               by=_by(request))  # fmt: skip
    return web.json_response({"host": host, "maintenance": body["on"], "leader": leader})


async def _pause_set(request: web.Request) -> web.Response:
    body = await _body(request, {"on": bool, "why": str})
    leader = await operations.pause(request.app[_CLIENT], request.app[_KEYS], body["on"], by=_by(request),
                                    why=body["why"])  # fmt: skip
    return web.json_response({"paused": body["on"], "leader": leader})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(metrics.MANAGER), headers={"Content-Type": CONTENT_TYPE_LATEST})


# (method, path, handler): the routes, also what the OpenAPI test checks against the document.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/", _dashboard),
    ("GET", "/openapi.json", _openapi),
    ("GET", "/metrics", _metrics),
    ("GET", "/v1/hosts", _hosts),
    ("GET", "/v1/vms", _vms),
    ("GET", "/v1/tasks", _tasks),
    ("GET", "/v1/recoveries/{vm}", _recoveries),
    ("GET", "/v1/events", _events),
    ("GET", "/v1/stream", _stream),
    ("GET", "/v1/policy", _policy),
    ("GET", "/v1/pause", _pause_get),
    ("POST", "/v1/pause", _pause_set),
    ("POST", "/v1/hosts/{host}/enable", _enable),
    ("POST", "/v1/hosts/{host}/maintenance", _maintenance),
)


def make_app(cfg: Config, client: EtcdClient, tokens: Tokens, vms: views.VmLister | None,
             keystone: KeystoneTokens | None = None) -> web.Application:  # fmt: skip
    app = web.Application(middlewares=[_auth_and_errors], client_max_size=MAX_BODY)
    keys = Keys(cfg.cluster.name)
    app[_CFG], app[_CLIENT], app[_KEYS], app[_TOKENS], app[_VMS] = cfg, client, keys, tokens, vms
    app[_KEYSTONE] = keystone
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)

    async def hub(app: web.Application) -> AsyncIterator[None]:
        h = Hub(client, keys)
        app[_HUB] = h
        h.start()
        yield
        await h.stop()

    app.cleanup_ctx.append(hub)
    return app


def tls_context(api: ApiConfig) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 at least); ssl.SSLError / OSError name a bad cert or key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(api.cert, api.key)
    return ctx


async def start(cfg: Config, api: ApiConfig, tls: ssl.SSLContext, tokens: Tokens,
                vms: views.VmLister | None, keystone: KeystoneTokens | None = None) -> web.AppRunner:  # fmt: skip
    """Serve on api.listen until the returned runner's cleanup(); its own etcd client."""
    # Its own client: the API's reads and their failures do not touch the manager's connection.
    client = EtcdClient(cfg.require_manager().endpoints, timeout=3.0, name="api", tls=cfg.etcd.tls())
    app = make_app(cfg, client, tokens, vms, keystone)

    async def close_client(app: web.Application) -> None:
        await client.close()

    app.on_cleanup.append(close_client)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    host, port = api.address()
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
    except OSError:
        await runner.cleanup()
        raise
    log.info("api: serving https://%s:%d/ (%d token(s)%s)", host, port, len(tokens),
             "" if keystone is None else f", Keystone tokens on project {keystone.cfg.project}")
    return runner


__all__ = ["ROUTES", "Hub", "make_app", "start", "tls_context"]
