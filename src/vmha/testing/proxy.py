"""A TCP proxy a test can cut: one per (host, plane) endpoint stands in for that host's network path.

    proxy = await TcpProxy.start("127.0.0.1", etcd_port)   # listens on 127.0.0.1:<free port>
    proxy.url                                              # http://127.0.0.1:<port> for the config
    proxy = await TcpProxy.to(etcd.client_urls[0])         # the same, keeping the URL's scheme (https)
    await proxy.cut()              # reset every connection, reset new ones (a link that is down)
    await proxy.cut(blackhole=True)  # keep connections, forward nothing (a path dropping packets)
    proxy.restore()
    await proxy.close()

Runs in the caller's asyncio loop; everything it opened is closed by close().
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from urllib.parse import urlsplit

from vmha.etcd.client import parse_endpoint


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a peer that vanished would, rather than a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


class TcpProxy:
    def __init__(self, listen_host: str, target_host: str, target_port: int, scheme: str = "http") -> None:
        self.listen_host = listen_host
        self.scheme = scheme  # of url: TLS passes through the proxy untouched
        self.target = (target_host, target_port)
        self.port = 0
        self.cut_mode: str | None = None  # None, "reset" or "blackhole"
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0

    @classmethod
    async def to(cls, url: str, listen_host: str = "127.0.0.1") -> TcpProxy:
        """A proxy to the etcd at ``url`` whose own url has the same scheme."""
        host, port = parse_endpoint(url)
        return await cls.start(host, port, listen_host, scheme=urlsplit(url).scheme)

    @classmethod
    async def start(cls, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                    scheme: str = "http") -> TcpProxy:  # fmt: skip
        p = cls(listen_host, target_host, target_port, scheme)
        p._server = await asyncio.start_server(p._accept, listen_host, 0)
        p.port = p._server.sockets[0].getsockname()[1]
        return p

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.listen_host}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.cut_mode == "reset":
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        t1 = asyncio.create_task(self._pump(reader, up_writer))
        t2 = asyncio.create_task(self._pump(up_reader, writer))
        self._tasks.update((t1, t2))
        try:
            await asyncio.wait([t1, t2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (t1, t2):
                t.cancel()
            self._tasks.difference_update((t1, t2))
            self._conns.discard(pair)
            writer.close()
            up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if self.cut_mode == "blackhole":
                    continue  # swallowed: the sender sees no error, only silence
                writer.write(data)
                await writer.drain()

    async def cut(self, blackhole: bool = False) -> None:
        """Cut the path: reset the open connections (or, blackhole: leave them open and silent)
        and treat new ones the same way."""
        self.cut_mode = "blackhole" if blackhole else "reset"
        if not blackhole:
            for client_w, upstream_w in list(self._conns):
                _reset(client_w)
                upstream_w.close()
        await asyncio.sleep(0)

    def restore(self) -> None:
        if self.cut_mode == "blackhole":
            # TCP would retransmit what a real lossy path dropped; we discarded it, so those streams
            # are corrupt: reset them and let the clients reconnect.
            for client_w, upstream_w in list(self._conns):
                _reset(client_w)
                upstream_w.close()
        self.cut_mode = None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for client_w, upstream_w in list(self._conns):
            client_w.close()
            upstream_w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["TcpProxy"]
