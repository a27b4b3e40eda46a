"""The ordered, duplex frame pipe between two paired endpoints.

Lifecycle: a transport's dialer or acceptor creates a channel, the handshake
runs over it, and then one link owns it until either side closes it or it
breaks. A channel is thread-safe for `send` (a link's writer and its control
replies share it); `recv_frame`/`recv_payload` are called by one reader thread
only, always payload-after-frame in order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pdserve.kv_transfer.frames import Frame


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, bfloat16 included)."""
    return tensor.reshape(-1).view(torch.uint8)


class Channel(ABC):
    @abstractmethod
    def send(self, frame: Frame, payload: torch.Tensor | None = None) -> None:
        """Write a frame and, if given, its payload's bytes (contiguous tensor)."""

    @abstractmethod
    def recv_frame(self) -> Frame:
        """Next frame; raises PeerLostError when the peer is gone."""

    @abstractmethod
    def recv_payload(self, frame: Frame, into: torch.Tensor) -> None:
        """Receive the payload of `frame` into `into` (contiguous, exactly payload_nbytes)."""

    def discard_payload(self, frame: Frame, device: torch.device | str = "cpu") -> None:
        """Consume a payload nobody wants; the stream must stay in step."""
        if frame.payload_nbytes:
            self.recv_payload(frame, torch.empty(frame.payload_nbytes, dtype=torch.uint8, device=device))

    @abstractmethod
    def set_timeout(self, seconds: float | None) -> None:
        """Bound blocking reads (used during the handshake); None blocks forever."""

    @abstractmethod
    def close(self) -> None:
        """Release the channel; the peer's reads end with PeerLostError. Idempotent."""
