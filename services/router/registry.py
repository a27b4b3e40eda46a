"""Every placement policy by name: the live router and the cluster simulator build theirs here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pdserve.router.policy import LeastLoaded, PlacementPolicy, RoundRobin, ShortestQueueKV
from pdserve.router.prefix_policy import PrefixAware
from pdserve.router.slo_policy import SloAware
from pdserve.router.splitwise import SplitwiseMixedPool
from pdserve.shared.config import POLICY_NAMES

if TYPE_CHECKING:
    from pdserve.shared.config import PrefixRoutingConfig

POLICIES: dict[str, Callable[[], PlacementPolicy]] = {
    cls.name: cls for cls in (RoundRobin, LeastLoaded, ShortestQueueKV, SplitwiseMixedPool, PrefixAware, SloAware)
}

if set(POLICIES) != set(POLICY_NAMES):  # the config validates names without importing the router
    raise ImportError(f"shared.config.POLICY_NAMES {sorted(POLICY_NAMES)} != the router's {sorted(POLICIES)}")


class UnknownPolicyError(ValueError):
    """A policy name that is not in `POLICIES`."""


def make_policy(name: str) -> PlacementPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise UnknownPolicyError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}") from None


def make_prefix_policy(config: "PrefixRoutingConfig") -> PlacementPolicy:
    """The prefix-aware policy with its configured weights over its configured base policy."""
    return PrefixAware(config, base=make_policy(config.base_policy))
