"""Every placement policy by name: the live router and the cluster simulator build theirs here."""

from __future__ import annotations

from typing import Callable

from pdserve.router.policy import LeastLoaded, PlacementPolicy, RoundRobin, ShortestQueueKV
from pdserve.router.splitwise import SplitwiseMixedPool

POLICIES: dict[str, Callable[[], PlacementPolicy]] = {
    cls.name: cls for cls in (RoundRobin, LeastLoaded, ShortestQueueKV, SplitwiseMixedPool)
}


class UnknownPolicyError(ValueError):
    """A policy name that is not in `POLICIES`."""


def make_policy(name: str) -> PlacementPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise UnknownPolicyError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}") from None
