"""A WebSocket client written by hand, for what aiohttp's client will not do: stop reading at the
TCP level (a tiny receive buffer, nothing consumed) and send malformed frames."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct


async def connect(port: int, path: str = "/api/v1/speak", rcvbuf: int | None = None,
                  headers: dict[str, str] | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a socket to 127.0.0.1:port and complete the handshake; returns (reader, writer, response head).
    With ``rcvbuf`` the kernel buffer is shrunk before connecting and the stream reader holds at
    most a few KiB, so a caller that never reads stops the server's writes almost at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024 if rcvbuf is not None else 2**16)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True, rsv: int = 0,
          length: int | None = None) -> bytes:
    """One frame as a client sends it; ``length`` overrides the declared payload length (to lie)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 2**16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(s: str) -> bytes:
    return frame(0x1, s.encode())


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame from the server (never masked): (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


def close_code(payload: bytes) -> int | None:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
