"""D's block reservations, sent back to the router over TCP: the handshake needs no shared disk.

Lifecycle:
  router: `ReservationInbox.start()` listens (bind host, a port in the
    configured range) and advertises `host:port`; every request the router
    sends to D carries that address (`DecodeParams.reply_to`). A handoff
    `wait()`s for its transfer id and `poll()`s it (taken once). Entries no
    one takes expire after `ttl_s` (the request ended before its reservation
    came).
  D (its engine core's scheduler thread): `ReservationPoster.post()` queues
    the reservation and returns; the poster's own thread dials `reply_to`
    (one kept connection per address), writes one JSON line and waits for
    the inbox's "ok" line. A lost connection (the router restarted, a
    half-open socket) is re-dialed once and the line sent again; the inbox
    keeps the first copy. The engine thread never blocks on the router.

Wire format, one line each way per reservation (UTF-8 JSON, newline ended):
  D -> router  {"reservation": {transfer_id, decode_endpoints, decode_block_ids, num_tokens, first_block}}
  router -> D  "ok" | {"error": "..."}
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import socket
import threading
import time
from typing import Protocol

from pdserve.kv_transfer.errors import ProtocolError, TransferError
from pdserve.kv_transfer.params import ParamsError, Reservation
from pdserve.kv_transfer.ports import PortRange, listen

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 16 << 20  # a 1M-token prompt's block ids at block size 16 fit with room to spare
_ACCEPT_POLL_S = 0.5  # accept() wakes this often to notice close()


def split_host_port(address: str) -> tuple[str, int]:
    """`"host:port"` or `"[v6]:port"` -> (host, port); ProtocolError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ProtocolError(f"malformed reservation address {address!r} (want host:port)")
    return host.strip("[]"), int(port)


class ReservationSource(Protocol):
    """What a handoff needs of the router's end (the inbox; a fake in tests)."""

    address: str  # where D posts: DecodeParams.reply_to

    def poll(self, transfer_id: str) -> Reservation | None: ...

    async def wait(self, transfer_id: str, timeout_s: float) -> None: ...


class ReservationInbox:
    """The router's end: reservations by transfer id, with async waiting."""

    def __init__(self, bind_host: str, advertise_host: str | None = None, port_range: PortRange | None = None,
                 ttl_s: float = 600.0, idle_timeout_s: float = 600.0) -> None:
        self.bind_host, self.advertise_host, self.port_range = bind_host, advertise_host, port_range
        self.ttl_s, self.idle_timeout_s = ttl_s, idle_timeout_s
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, tuple[float, Reservation]] = collections.OrderedDict()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._running = False
        self.address = ""
        self.counters = {"received": 0, "malformed": 0, "expired": 0, "duplicates": 0}

    def start(self) -> str:
        """Listen; returns the address D posts to."""
        self._server = listen(self.bind_host, self.port_range)
        self._server.settimeout(_ACCEPT_POLL_S)
        self._running = True
        port = self._server.getsockname()[1]
        host = self.advertise_host or self.bind_host
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        threading.Thread(target=self._accept_loop, daemon=True, name="pdserve-reservation-inbox").start()
        log.info("reservation inbox listening on %s:%d, advertised as %s", self.bind_host, port, self.address)
        return self.address

    def close(self) -> None:
        """Stop listening and end every connection (D re-dials whoever listens next)."""
        self._running = False
        if self._server is not None:
            self._server.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's blocked read
            except OSError:
                pass

    # -- the router's side ------------------------------------------------------------------
    def poll(self, transfer_id: str) -> Reservation | None:
        """The reservation if it came (taken once), else None; never blocks."""
        with self._lock:
            entry = self._entries.pop(transfer_id, None)
        return entry[1] if entry is not None else None

    async def wait(self, transfer_id: str, timeout_s: float) -> None:
        """Returns when a reservation for `transfer_id` is there, or after `timeout_s`."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            if transfer_id in self._entries:
                return
            self._waiters.setdefault(transfer_id, []).append((loop, event))
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                waiters = self._waiters.get(transfer_id, [])
                if (loop, event) in waiters:
                    waiters.remove((loop, event))
                if not waiters:
                    self._waiters.pop(transfer_id, None)

    def deliver(self, reservation: Reservation) -> None:
        """Store one reservation and wake its waiters (the connection threads call this)."""
        now = time.monotonic()
        with self._lock:
            while self._entries:  # oldest first: stop at the first one still fresh
                tid, (at, _) = next(iter(self._entries.items()))
                if now - at < self.ttl_s:
                    break
                del self._entries[tid]
                self.counters["expired"] += 1
            if reservation.transfer_id in self._entries:
                self.counters["duplicates"] += 1  # a re-sent line after a lost ack: keep the first
                return
            self._entries[reservation.transfer_id] = (now, reservation)
            self.counters["received"] += 1
            waiters = self._waiters.pop(reservation.transfer_id, [])
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    # -- connections ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._server is not None
        while self._running:
            try:
                conn, peer = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                             name="pdserve-reservation-conn").start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        # An idle connection is normal (D keeps it for the next request); a very long silence ends it,
        # and D re-dials on its next reservation.
        conn.settimeout(self.idle_timeout_s)
        with self._lock:
            if not self._running:
                conn.close()
                return
            self._conns.add(conn)
        try:
            self._read_lines(conn, peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _read_lines(self, conn: socket.socket, peer: object) -> None:
        with conn.makefile("rb") as reader:
            while self._running:
                try:
                    line = reader.readline(MAX_LINE_BYTES + 1)
                except OSError:
                    return
                if not line:
                    return
                try:
                    self.deliver(self._parse(line))
                    conn.sendall(b'"ok"\n')
                except ProtocolError as exc:
                    self.counters["malformed"] += 1
                    log.warning("reservation from %s refused: %s", peer, exc)
                    try:
                        conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
                    except OSError:
                        return
                    if not line.endswith(b"\n"):
                        return  # an over-long line: the rest of it would read as garbage
                except OSError:
                    return

    @staticmethod
    def _parse(line: bytes) -> Reservation:
        if not line.endswith(b"\n"):
            raise ProtocolError(f"reservation line longer than {MAX_LINE_BYTES} bytes")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ProtocolError(f"reservation line is not JSON: {exc}") from exc
        if not isinstance(message, dict) or "reservation" not in message:
            raise ProtocolError("reservation line lacks 'reservation'")
        try:
            return Reservation.from_dict(message["reservation"])
        except ParamsError as exc:
            raise ProtocolError(str(exc)) from exc


class PostError(TransferError):
    """A reservation could not be delivered to the router."""


class ReservationPoster:
    """D's end: queues reservations and delivers them from its own thread."""

    def __init__(self, connect_timeout_s: float = 5.0, ack_timeout_s: float = 5.0) -> None:
        self.connect_timeout_s, self.ack_timeout_s = connect_timeout_s, ack_timeout_s
        self._queue: queue.Queue[tuple[str, Reservation] | None] = queue.Queue()
        self._conns: dict[str, tuple[socket.socket, object]] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.counters = {"posted": 0, "post_failed": 0}

    def post(self, reply_to: str, reservation: Reservation) -> None:
        """Queue one reservation for `reply_to`; never blocks."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="pdserve-reservation-poster")
                self._thread.start()
        self._queue.put((reply_to, reservation))

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            reply_to, reservation = item
            line = json.dumps({"reservation": reservation.to_dict()}).encode() + b"\n"
            try:
                self._deliver(reply_to, line)
                self.counters["posted"] += 1
            except (PostError, ProtocolError) as exc:
                self.counters["post_failed"] += 1
                log.error("reservation for transfer %s not delivered to %s: %s", reservation.transfer_id,
                          reply_to, exc)
        for sock, reader in self._conns.values():
            reader.close()  # type: ignore[attr-defined]
            sock.close()

    def _deliver(self, address: str, line: bytes) -> None:
        """Send and read the ack; a broken kept connection is re-dialed once."""
        for attempt in (1, 2):
            try:
                sock, reader = self._connection(address)
                sock.sendall(line)
                answer = reader.readline(64 << 10)  # type: ignore[attr-defined]
            except OSError as exc:
                self._drop(address)
                if attempt == 2:
                    raise PostError(f"{type(exc).__name__}: {exc}") from exc
                continue
            if not answer:  # closed under us (a restarted router): once more on a fresh connection
                self._drop(address)
                if attempt == 2:
                    raise PostError("the inbox closed the connection")
                continue
            try:
                reply = json.loads(answer)
            except ValueError as exc:
                raise PostError(f"the inbox answered garbage: {answer[:80]!r}") from exc
            if reply != "ok":
                raise PostError(f"the inbox refused it: {reply}")
            return

    def _connection(self, address: str) -> tuple[socket.socket, object]:
        conn = self._conns.get(address)
        if conn is None:
            sock = socket.create_connection(split_host_port(address), timeout=self.connect_timeout_s)
            sock.settimeout(self.ack_timeout_s)  # every send and every ack read is bounded
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self._conns[address] = (sock, sock.makefile("rb"))
        return conn

    def _drop(self, address: str) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            conn[1].close()  # type: ignore[attr-defined]
            conn[0].close()
