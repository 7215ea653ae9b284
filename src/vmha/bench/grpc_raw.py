"""A minimal gRPC client connection (HTTP/2 spoken by hand) for the detection benchmark's load.

Why not grpcio: the benchmark simulates 500 hosts with one connection per (host, plane), 1,500
connections making 6,000 calls a second. Through grpcio's asyncio API each call costs about 150 us
of Python; on this 2-core machine the generator then takes the CPU of etcd and of the monitor it is
there to measure, and its late beats become false verdicts. A pure-Python HTTP/2 library (h2) costs
as much per frame. This speaks just the HTTP/2 (RFC 9113) a few etcd calls need, for about a tenth
of the cost:

- unary calls and client-streaming calls, each a new stream with a header block encoded once
  (HPACK static table and literals, RFC 7541: no dynamic table, no Huffman);
- the server's header blocks are never decoded: a unary call succeeded when a message came back;
  gRPC sends errors as trailers only, without a message, which is all the generator needs to know;
- receive windows opened to the maximum at once (the replies are small); send windows tracked, as
  the server's WINDOW_UPDATE frames and SETTINGS say; PING answered; GOAWAY ends the connection.

For benchmarks only: the agent and the manager use aetcd (grpcio).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from vmha.etcd.tls import TlsFiles

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_SETTINGS_INITIAL_WINDOW_SIZE = 0x4
_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65_535


class CallFailed(Exception):
    """The call ended without a reply message (a gRPC error, a reset stream or a lost connection)."""


def frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + stream.to_bytes(4, "big") + payload


def _string(b: bytes) -> bytes:
    if len(b) >= 127:  # one length byte (7-bit prefix, no Huffman) is all our names and values need
        raise ValueError(f"header value too long for this encoder: {b!r}")
    return bytes((len(b),)) + b


def header_block(authority: str, path: str) -> bytes:
    """HPACK block of a gRPC request: POST (static 3), http (static 6), :path and :authority as
    literals with static names (4, 1), content-type (static name 31), te: trailers."""
    return (
        b"\x83\x86\x04" + _string(path.encode()) + b"\x01" + _string(authority.encode())
        + b"\x0f\x10" + _string(b"application/grpc") + b"\x00" + _string(b"te") + _string(b"trailers")
    )  # fmt: skip


def grpc_message(msg: bytes) -> bytes:
    return b"\x00" + len(msg).to_bytes(4, "big") + msg  # not compressed, length, message


# Protocol buffers, the little of them the etcd calls need (non-negative integers, bytes) --------


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pb_int(field: int, n: int) -> bytes:
    return varint(field << 3) + varint(n) if n else b""  # proto3 leaves zero out


def pb_bytes(field: int, b: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(b)) + b


def pb_fields(msg: bytes) -> dict[int, int | bytes]:
    """Top-level fields of a message: varints as int (int64 read as signed), length-delimited as bytes."""
    out: dict[int, int | bytes] = {}
    i, n = 0, len(msg)

    def read_varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = msg[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < n:
        key = read_varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            v = read_varint()
            out[field] = v - (1 << 64) if v >= 1 << 63 else v
        elif wire == 2:
            length = read_varint()
            out[field] = msg[i : i + length]
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"protobuf wire type {wire} not understood")
    return out


def pb_int_field(fields: dict[int, int | bytes], field: int) -> int:
    v = fields.get(field, 0)  # proto3 leaves zero out
    if not isinstance(v, int):
        raise ValueError(f"protobuf field {field} is not an integer")
    return v


# The connection ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    on_message: Callable[[bytes], None]
    on_end: Callable[[bool], None] | None  # called once, with whether any message came back
    window: int  # what we may still send on it
    buf: bytes = b""
    replied: bool = False


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS client context for etcd: its CA, a client certificate, ALPN h2 (gRPC needs HTTP/2)."""
    ctx = ssl.create_default_context(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


class RawGrpcConnection(asyncio.Protocol):
    """One TCP connection to a gRPC server. Not thread-safe; one event loop."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._streams: dict[int, _Stream] = {}
        self._next_stream = 1
        self._send_window = _DEFAULT_WINDOW  # connection level
        self._initial_window = _DEFAULT_WINDOW  # per new stream, as the server's SETTINGS say
        self._blocks: dict[str, bytes] = {}

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = 10.0,
                   tls: ssl.SSLContext | None = None) -> RawGrpcConnection:  # fmt: skip
        """With ``tls``: HTTP/2 over TLS (the context must offer ALPN h2, see client_context)."""
        loop = asyncio.get_running_loop()
        conn = cls(f"{host}:{port}")
        await asyncio.wait_for(loop.create_connection(lambda: conn, host.strip("[]"), port, ssl=tls,
                                                      server_hostname=host.strip("[]") if tls else None), timeout)
        return conn

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        settings = _SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + _MAX_WINDOW.to_bytes(4, "big")
        transport.write(
            _PREFACE + frame(_SETTINGS, 0, 0, settings)
            + frame(_WINDOW_UPDATE, 0, 0, (_MAX_WINDOW - _DEFAULT_WINDOW).to_bytes(4, "big"))
        )  # fmt: skip

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        streams, self._streams = self._streams, {}
        for s in streams.values():
            if s.on_end is not None:
                s.on_end(s.replied)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, n = 0, len(buf)
        while n - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + 9 + length
            if end > n:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            self._frame(ftype, flags, stream, bytes(buf[pos + 9 : end]))
            pos = end
        del buf[:pos]

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == _DATA:
            if flags & _PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if (s := self._streams.get(sid)) is not None:
                s.buf += payload
                while len(s.buf) >= 5 and len(s.buf) >= 5 + (size := int.from_bytes(s.buf[1:5], "big")):
                    msg, s.buf = s.buf[5 : 5 + size], s.buf[5 + size :]
                    s.replied = True
                    s.on_message(msg)
            if flags & _END_STREAM:
                self._end(sid)
        elif ftype == _HEADERS:
            if flags & _END_STREAM:  # trailers (or an error as trailers only)
                self._end(sid)
        elif ftype == _RST_STREAM:
            self._end(sid)
        elif ftype == _SETTINGS and not flags & _ACK:
            for i in range(0, len(payload) - 5, 6):
                if int.from_bytes(payload[i : i + 2], "big") == _SETTINGS_INITIAL_WINDOW_SIZE:
                    new = int.from_bytes(payload[i + 2 : i + 6], "big")
                    for s in self._streams.values():
                        s.window += new - self._initial_window
                    self._initial_window = new
            self._write(frame(_SETTINGS, _ACK, 0, b""))
        elif ftype == _PING and not flags & _ACK:
            self._write(frame(_PING, _ACK, 0, payload))
        elif ftype == _GOAWAY:
            self.close()
        elif ftype == _WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if sid == 0:
                self._send_window += inc
            elif (s := self._streams.get(sid)) is not None:
                s.window += inc
        # PRIORITY, PUSH_PROMISE (disabled by default for a client that never enables it: we do not),
        # CONTINUATION of header blocks we do not read: nothing to do.

    def _end(self, sid: int) -> None:
        if (s := self._streams.pop(sid, None)) is not None and s.on_end is not None:
            s.on_end(s.replied)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self.closed:
            self._transport.write(data)

    # calls

    def _block(self, path: str) -> bytes:
        if (b := self._blocks.get(path)) is None:
            b = self._blocks[path] = header_block(self.authority, path)
        return b

    def _data(self, sid: int, s: _Stream, msg: bytes, end: bool) -> bytes:
        body = grpc_message(msg)
        if len(body) > min(self._send_window, s.window):
            # The server stopped granting window: a stuck server. Fail rather than queue.
            raise CallFailed(f"{self.authority}: HTTP/2 send window exhausted")
        self._send_window -= len(body)
        s.window -= len(body)
        return frame(_DATA, _END_STREAM if end else 0, sid, body)

    def _new_stream(self, path: str, on_message: Callable[[bytes], None],
                    on_end: Callable[[bool], None] | None) -> tuple[int, _Stream, bytes]:  # fmt: skip
        if self.closed:
            raise CallFailed(f"{self.authority}: connection closed")
        sid = self._next_stream
        self._next_stream += 2
        s = self._streams[sid] = _Stream(on_message, on_end, self._initial_window)
        return sid, s, frame(_HEADERS, _END_HEADERS, sid, self._block(path))

    def call(self, path: str, msg: bytes, on_reply: Callable[[bytes | None], None]) -> None:
        """A unary call; ``on_reply`` gets the reply message, or None if the call failed."""
        reply: list[bytes] = []

        def on_end(replied: bool) -> None:
            on_reply(reply[0] if replied else None)

        sid, s, headers = self._new_stream(path, reply.append, on_end)
        self._write(headers + self._data(sid, s, msg, end=True))

    async def unary(self, path: str, msg: bytes, timeout: float = 10.0) -> bytes:
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

        def done(reply: bytes | None) -> None:
            if not fut.done():
                fut.set_result(reply)

        self.call(path, msg, done)
        if (reply := await asyncio.wait_for(fut, timeout)) is None:
            raise CallFailed(f"{self.authority}{path}: no reply")
        return reply

    def open_stream(self, path: str, on_message: Callable[[bytes], None], on_end: Callable[[bool], None]) -> int:
        """A client-streaming call left open; ``send`` writes to it. Returns its stream id."""
        sid, _, headers = self._new_stream(path, on_message, on_end)
        self._write(headers)
        return sid

    def send(self, sid: int, msg: bytes) -> None:
        """One message on a stream opened by ``open_stream``."""
        if (s := self._streams.get(sid)) is None:
            raise CallFailed(f"{self.authority}: stream {sid} is closed")
        self._write(self._data(sid, s, msg, end=False))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self.closed = True


__all__ = ["CallFailed", "RawGrpcConnection", "pb_bytes", "pb_fields", "pb_int", "pb_int_field"]
