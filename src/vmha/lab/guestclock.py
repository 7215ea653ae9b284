"""The lab host's clock service for its QEMU guests: `python -m vmha.lab.guestclock HOST SOCKET`.

Each guest asks before every disk record which host it runs on and what time it is ("? NONCE"), over a
virtio-serial port that QEMU connects to this socket; the answer is "NONCE HOST UNIXTIME MONOTONIC". So
a record names the host the guest runs on now, also after a live migration (the destination's QEMU
connects to the destination's service), and its times are the host's clocks within the round trip
(milliseconds), which a TCG guest's own clock (set from a 1 s RTC) could not give. MONOTONIC (the
machine's CLOCK_MONOTONIC, shared by every lab host) lets verify measure a silence across a step of
the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

MAX_LINE = 64  # a question is "? " and a number: anything longer is not from our guest


async def _serve(host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            parts = line.split()
            if len(line) > MAX_LINE or len(parts) != 2 or parts[0] != b"?" or not parts[1].isdigit():
                continue
            writer.write(b"%s %s %.4f %.4f\n" % (parts[1], host.encode(), time.time(), time.monotonic()))
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(host: str, socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    server = await asyncio.start_unix_server(lambda r, w: _serve(host, r, w), path=str(socket_path))
    os.chmod(socket_path, 0o666)
    async with server:
        await server.serve_forever()


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m vmha.lab.guestclock HOST SOCKET")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(sys.argv[1], Path(sys.argv[2])))


if __name__ == "__main__":
    main()
