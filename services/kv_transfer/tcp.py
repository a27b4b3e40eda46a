"""The TCP transport: length-prefixed frames over one socket per pair, for any two hosts.

Lifecycle: `start()` binds a listening socket on an OS-assigned port and
accepts on a daemon thread; each accepted connection runs the acceptor's
handshake on a thread of its own and becomes an inbound link. Senders dial
lazily. Payloads go zero-copy both ways: `sendall` reads the tensor's memory
through a memoryview and the reader `recv_into`s the posted buffer directly,
so a layer is copied only by the kernel.
"""

from __future__ import annotations

import socket
import struct
import threading
from urllib.parse import urlsplit

import torch

from pdserve.kv_transfer.channel import Channel, as_bytes
from pdserve.kv_transfer.errors import HandshakeError, PeerLostError, ProtocolError
from pdserve.kv_transfer.frames import PREFIX, Frame, decode_header, decode_prefix
from pdserve.kv_transfer.ports import listen
from pdserve.kv_transfer.transport import LinkTransport

# recv_into asks for at most this much per call: big enough to amortise the
# syscall, small enough that the kernel can hand over what it has.
_RECV_CHUNK = 8 << 20


def split_address(address: str) -> tuple[str, int]:
    """`"tcp://host:port"` -> (host, port); HandshakeError on anything else."""
    parts = urlsplit(address)
    if not parts.hostname or parts.port is None:
        raise HandshakeError(f"malformed transport address {address!r}")
    return parts.hostname, parts.port


def _set_deadlines(sock: socket.socket, send_timeout_s: float) -> None:
    """A send blocked on a peer that stopped reading fails after `send_timeout_s` (SO_SNDTIMEO, so reads
    may still wait on an idle link); keepalives and TCP_USER_TIMEOUT notice a peer host that vanished."""
    seconds = int(send_timeout_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", seconds, int((send_timeout_s - seconds) * 1e6)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", int(send_timeout_s * 1000))):
        if hasattr(socket, name):  # Linux names; elsewhere the send timeout still holds
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class SocketChannel(Channel):
    def __init__(self, sock: socket.socket, buffer_bytes: int | None = None, send_timeout_s: float = 10.0) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # control frames must not wait for Nagle
        _set_deadlines(sock, send_timeout_s)
        if buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._closed = False

    def send(self, frame: Frame, payload: torch.Tensor | None = None) -> None:
        header = frame.encode_header()
        try:
            with self._send_lock:  # header and payload must not interleave with another frame
                self._sock.sendall(header)
                if payload is not None:
                    self._sock.sendall(memoryview(as_bytes(payload).numpy()))
        except OSError as exc:
            raise PeerLostError(f"send failed: {exc}") from exc

    def _recv_exact(self, view: memoryview) -> None:
        offset, total = 0, len(view)
        try:
            while offset < total:
                got = self._sock.recv_into(view[offset:], min(total - offset, _RECV_CHUNK))
                if got == 0:
                    raise PeerLostError("peer closed the connection")
                offset += got
        except OSError as exc:
            raise PeerLostError(f"receive failed: {exc}") from exc

    def recv_frame(self) -> Frame:
        prefix = bytearray(PREFIX.size)
        self._recv_exact(memoryview(prefix))
        kind, header_len, payload_len = decode_prefix(bytes(prefix))
        body = bytearray(header_len)
        self._recv_exact(memoryview(body))
        return decode_header(kind, bytes(body), payload_len)

    def recv_payload(self, frame: Frame, into: torch.Tensor) -> None:
        flat = as_bytes(into)
        if flat.numel() != frame.payload_nbytes:
            raise ProtocolError(f"payload of {frame.payload_nbytes} bytes for a {flat.numel()}-byte buffer")
        self._recv_exact(memoryview(flat.numpy()))

    def set_timeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv_into
        except OSError:
            pass
        self._sock.close()


class TcpTransport(LinkTransport):
    kind = "tcp"

    _server: socket.socket | None = None
    _accepting = False

    def _listen(self) -> str:
        self._server = listen(self.config.bind_host, self.config.port_range)
        # accept() with a timeout so close() is noticed without relying on the
        # platform waking a blocked accept when the socket closes.
        self._server.settimeout(0.5)
        self._accepting = True
        threading.Thread(target=self._accept_loop, args=(self._server,), daemon=True,
                         name=f"kv-{self.kind}-{self.instance_id}-listener").start()
        return f"{self.kind}://{self.config.host_for_peers}:{self._server.getsockname()[1]}"

    def _accept_loop(self, server: socket.socket) -> None:
        while self._accepting:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            channel = SocketChannel(conn, self.config.socket_buffer_bytes, self.config.send_timeout_s)
            threading.Thread(target=self._accept, args=(channel,), daemon=True,
                             name=f"kv-{self.kind}-{self.instance_id}-handshake").start()

    def _dial(self, address: str) -> Channel:
        host, port = split_address(address)
        sock = socket.create_connection((host, port), timeout=self.config.connect_timeout_s)
        sock.settimeout(None)  # blocking from here on: sends are bounded by SO_SNDTIMEO instead
        return SocketChannel(sock, self.config.socket_buffer_bytes, self.config.send_timeout_s)

    def _stop_listening(self) -> None:
        self._accepting = False
        if self._server is not None:
            self._server.close()
