"""Instance roles: which phases of a request an engine instance runs."""

from __future__ import annotations

import enum


class Role(str, enum.Enum):
    """What an engine instance does with the requests it is given."""

    MIXED = "mixed"  # prefill and decode colocated (the foundation path)
    PREFILL = "prefill"  # computes prompts, hands the KV cache on
    DECODE = "decode"  # generates tokens from a KV cache it was handed

    @property
    def runs_prefill(self) -> bool:
        return self in (Role.MIXED, Role.PREFILL)

    @property
    def runs_decode(self) -> bool:
        return self in (Role.MIXED, Role.DECODE)


class InstanceState(str, enum.Enum):
    """Where an instance's engine stands, as its worker and the controller see it."""

    STARTING = "starting"  # the engine is loading; not placed on
    READY = "ready"  # serving
    DEAD = "dead"  # the engine core (or the actor) died; requests on it failed; a restart is due
    RESTARTING = "restarting"  # the controller is bringing a new engine up
    DRAINING = "draining"  # leaving (scale-down): its requests finish, no new ones are placed on it

    @property
    def serving(self) -> bool:
        return self is InstanceState.READY
