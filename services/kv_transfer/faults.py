"""Fault injection for the loopback transport, so failure paths run in CI.

Lifecycle: a test builds a `FaultPlan` and hands it to the `LoopbackFabric`;
every loopback channel consults it on each DATA frame it carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FaultPlan:
    """What goes wrong on the wire; layers count from 0."""

    delay_s: float = field(default=0.0, metadata={"description": "Sleep before delivering each DATA frame (slow link)."})
    drop_layers: frozenset[int] = field(
        default=frozenset(), metadata={"description": "DATA frames of these layers vanish (the receiver times out)."})
    break_at_layer: int | None = field(
        default=None, metadata={"description": "The link dies when this layer is sent (peer death, cable pulled)."})

    def drops(self, layer: int) -> bool:
        return layer in self.drop_layers

    def breaks(self, layer: int) -> bool:
        return self.break_at_layer is not None and layer == self.break_at_layer
