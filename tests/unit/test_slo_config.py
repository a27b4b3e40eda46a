"""The `slo` section in the one config tree: YAML, validation, what `pdserve serve` builds from it."""

from __future__ import annotations

import pytest

from pdserve.launcher import _policy
from pdserve.router.slo_policy import SloAware
from pdserve.shared.config import ServeConfig
from pdserve.shared.errors import ConfigError
from pdserve.shared.slo import Priority, RequestSlo


def test_slo_section_loads_from_yaml_and_reaches_the_policy(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gateway: {routing_policy: slo_aware}\n"
                    "slo:\n  interactive: {ttft_ms: 800, tpot_ms: 40}\n  default_priority: batch\n"
                    "  admission: {interactive_queue: 8, batch_timeout_s: 5}\n")
    cfg = ServeConfig.load(path)
    assert cfg.slo.resolve(priority=Priority.INTERACTIVE) == RequestSlo(0.8, 0.04, Priority.INTERACTIVE)
    assert cfg.slo.resolve().priority is Priority.BATCH
    assert cfg.slo.queue_limit(Priority.INTERACTIVE) == (8, 2.0)
    policy = _policy(cfg)
    assert isinstance(policy, SloAware) and policy.config is cfg.slo


@pytest.mark.parametrize("section", [
    {"interactive": {"ttft_ms": 0, "tpot_ms": 10}},
    {"batch": {"ttft_ms": 100}},
    {"default_priority": "urgent"},
    {"admission": {"batch_kv_reserve": 1.5}},
    {"admission": {"interactive_queue": -1}},
    {"perf": {"handoff_bandwidth_gbps": 0}},
    {"no_such_key": 1},
])
def test_bad_slo_settings_are_config_errors(section):
    with pytest.raises(ConfigError):
        ServeConfig.load(overrides={"slo": section})


def test_defaults_need_no_slo_section():
    cfg = ServeConfig.load()
    assert cfg.slo.resolve() == RequestSlo(2.0, 0.2, Priority.INTERACTIVE)
