"""A direct channel for an engine instance's output batches: the actor's socket to the gateway.

Ray stays the control plane (the gateway learns the channel's address and
secret through an actor call); the token deltas, one batch per engine step
across every request, go over one TCP connection, framed as a 4-byte length
and a pickle. A Ray streaming item costs the consumer and the actor about a
millisecond of CPU each on a two-core machine, a frame a few tens of
microseconds: at a few hundred engine steps a second that is a core's share.

Lifecycle: the actor starts an `OutputChannel` on its node address once (it
outlives engine restarts, as the outbox does) -> the gateway calls the actor
for (host, port, secret) -> connects, sends the secret -> reads frames until
the connection ends. The actor's death closes the socket: the reader's
iteration ends with `ChannelClosed`, which the client treats as the
instance's death. A new connection replaces the previous one (one reader per
instance: the outbox is drained by whoever holds the channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import pickle
import secrets
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator

logger = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
_MAX_FRAME = 1 << 30  # a batch larger than this is a broken stream, not output
CONNECT_TIMEOUT_S = 10.0


class ChannelClosed(ConnectionError):
    """The instance's end of the channel went away (its actor died or stopped)."""


class ChannelRefused(ConnectionError):
    """The channel could not be opened (unreachable, wrong secret): the caller falls back to Ray."""


@dataclass(frozen=True)
class ChannelAddress:
    host: str
    port: int
    secret: str


def frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


class OutputChannel:
    """Actor side: serves the outbox's batches to the one connected reader."""

    def __init__(self, outbox: asyncio.Queue, host: str, port_range: tuple[int, int] | None = None) -> None:
        self.outbox, self.host = outbox, host
        self.port_range = port_range  # firewalls between Ray nodes often open only a range (kv_transfer.port_range)
        self.secret = secrets.token_hex(16)
        self._server: asyncio.base_events.Server | None = None
        self._current: asyncio.Task | None = None  # the connection being served
        self.port = 0

    async def start(self) -> ChannelAddress:
        if self._server is None:
            from pdserve.kv_transfer.ports import listen

            self._server = await asyncio.start_server(self._serve, sock=listen(self.host, self.port_range))
            self.port = self._server.sockets[0].getsockname()[1]
        return self.address

    @property
    def address(self) -> ChannelAddress:
        return ChannelAddress(self.host, self.port, self.secret)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            offered = await asyncio.wait_for(reader.readexactly(len(self.secret)), CONNECT_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if not hmac.compare_digest(offered, self.secret.encode()):
            logger.warning("output channel: a connection with a wrong secret, closed")
            writer.close()
            return
        if self._current is not None:  # the gateway reconnected: the old reader gets nothing more
            self._current.cancel()
        self._current = asyncio.current_task()
        writer.write(b"ok")
        try:
            while True:
                batch = [await self.outbox.get()]
                while not self.outbox.empty():
                    batch.append(self.outbox.get_nowait())
                writer.write(frame(batch))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the reader left; what it did not read is lost with it, as with a Ray stream
        finally:
            if self._current is asyncio.current_task():
                self._current = None
            writer.close()

    async def close(self) -> None:
        if self._current is not None:
            self._current.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None


async def read_batches(address: ChannelAddress, timeout_s: float = CONNECT_TIMEOUT_S) -> AsyncIterator[list]:
    """Gateway side: connect and yield batches; `ChannelRefused` if it cannot open, `ChannelClosed` at its end."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ChannelRefused(f"output channel {address.host}:{address.port}: {exc}") from exc
    try:
        writer.write(address.secret.encode())
        try:
            if await asyncio.wait_for(reader.readexactly(2), timeout_s) != b"ok":
                raise ChannelRefused("output channel: unexpected greeting")
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as exc:
            raise ChannelRefused(f"output channel {address.host}:{address.port} refused: {exc}") from exc
        while True:
            try:
                (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
                if size > _MAX_FRAME:
                    raise ChannelClosed(f"output channel: a {size}-byte frame")
                body = await reader.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise ChannelClosed(f"output channel {address.host}:{address.port} closed") from exc
            yield pickle.loads(body)
    finally:
        writer.close()
