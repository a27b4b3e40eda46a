"""Transports over a stateless pairwise torch.distributed process group (gloo; NCCL builds on it).

Lifecycle: the transport listens like the TCP transport (control socket,
OS-assigned port) and also hosts a TCPStore on an OS-assigned port. At the
handshake the acceptor names a fresh key prefix and its store's port in
WELCOME; both sides then build a two-rank process group directly from the
store (dialer = rank 0 sends, acceptor = rank 1 receives). No global default
group is created, so an instance can pair with any number of peers, and with
peers that come and go. Headers keep travelling on the control socket; each
payload follows its header through `pg.send`/`pg.recv`, in the same order,
because only the link's single writer sends payloads and its single reader
receives them.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from pdserve.kv_transfer.channel import Channel, as_bytes
from pdserve.kv_transfer.errors import HandshakeError, ProtocolError
from pdserve.kv_transfer.frames import Frame
from pdserve.kv_transfer.layout import EndpointInfo
from pdserve.kv_transfer.ports import NoFreePortError, candidate_ports
from pdserve.kv_transfer.tcp import TcpTransport, split_address

SENDER_RANK, RECEIVER_RANK = 0, 1


class GroupChannel(Channel):
    """Headers on a control channel, payloads through a two-rank process group."""

    def __init__(self, control: Channel, group: Any, rank: int, keepalive: Any, device: torch.device,
                 timeout_s: float) -> None:
        self._control, self._group, self._rank = control, group, rank
        self._peer_rank = RECEIVER_RANK if rank == SENDER_RANK else SENDER_RANK
        self._keepalive = keepalive  # the store the group was built from must outlive it
        self._device = device
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._payload_lock = threading.Lock()

    def send(self, frame: Frame, payload: torch.Tensor | None = None) -> None:
        if payload is None:
            self._control.send(frame)
            return
        with self._payload_lock:  # header order on the socket must equal payload order in the group
            self._control.send(frame)
            self._group.send([as_bytes(payload)], self._peer_rank, 0).wait(self._timeout)
            self._sync()

    def recv_frame(self) -> Frame:
        return self._control.recv_frame()

    def recv_payload(self, frame: Frame, into: torch.Tensor) -> None:
        flat = as_bytes(into)
        if flat.numel() != frame.payload_nbytes:
            raise ProtocolError(f"payload of {frame.payload_nbytes} bytes for a {flat.numel()}-byte buffer")
        self._group.recv([flat], self._peer_rank, 0).wait(self._timeout)
        self._sync()

    def _sync(self) -> None:
        # On GPUs wait() only orders streams; the layer counts as landed (and the
        # source as free) once the copy really finished.
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()

    def set_timeout(self, seconds: float | None) -> None:
        self._control.set_timeout(seconds)

    def close(self) -> None:
        self._control.close()
        abort = getattr(self._group, "abort", None)
        if callable(abort):  # NCCL: unblock any pending op instead of hanging until its timeout
            try:
                abort()
            except RuntimeError:
                pass


class TorchDistTransport(TcpTransport):
    """Base of the process-group transports; subclasses build the group for their backend."""

    backend: ClassVar[str]
    _store: Any = None

    def _listen(self) -> str:
        address = super()._listen()
        last: Exception | None = None
        for port in candidate_ports(self.config.port_range):
            if port and port == split_address(address)[1]:
                continue  # the control socket has it
            try:
                self._store = dist.TCPStore(self.config.bind_host, port, None, True, self._store_timeout(),
                                            wait_for_workers=False)
                return address
            except (RuntimeError, OSError) as exc:  # the port is taken: the next one
                last = exc
        raise NoFreePortError(f"no free port for the rendezvous store in {self.config.port_range}: {last}")

    def _store_timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.config.connect_timeout_s)

    def _welcome_details(self, peer: EndpointInfo) -> dict[str, Any]:
        return {"store_port": self._store.port, "prefix": f"kvpair/{peer.instance_id}/{uuid.uuid4().hex}"}

    def _pair(self, channel: Channel, role: str, details: dict[str, Any], peer: EndpointInfo) -> Channel:
        port, prefix = details.get("store_port"), details.get("prefix")
        if not isinstance(port, int) or not isinstance(prefix, str):
            raise HandshakeError(f"{peer.instance_id} sent no process-group rendezvous in WELCOME")
        if role == "acceptor":
            store, rank = self._store, RECEIVER_RANK
        else:
            host, _ = split_address(peer.address)
            store, rank = dist.TCPStore(host, port, None, False, self._store_timeout()), SENDER_RANK
        try:
            group = self._make_group(dist.PrefixStore(prefix, store), rank)
        except RuntimeError as exc:
            raise HandshakeError(f"could not form a {self.backend} group with {peer.instance_id}: {exc}") from exc
        return GroupChannel(channel, group, rank, store, self.device, self.config.transfer_timeout_s)

    def _make_group(self, store: Any, rank: int) -> Any:
        raise NotImplementedError

    def _stop_listening(self) -> None:
        super()._stop_listening()
        self._store = None


class GlooTransport(TorchDistTransport):
    kind = "gloo"
    backend = "gloo"

    def _make_group(self, store: Any, rank: int) -> Any:
        options = dist.ProcessGroupGloo._Options()
        options._timeout = datetime.timedelta(seconds=self.config.transfer_timeout_s)
        # Pin gloo to the interface we listen on; its default resolves the
        # hostname, which may name an interface the peer cannot reach.
        host = self.config.bind_host if self.config.bind_host not in ("0.0.0.0", "::") else ""
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, rank, 2, options)
