"""The vLLM plugin's bound on the shared-memory queue's busy-wait."""

import inspect

import pytest


@pytest.fixture
def spin_condition(monkeypatch):
    """vLLM's SpinCondition with a socket-free constructor (what it sets is what matters here)."""
    pytest.importorskip("vllm")
    from vllm.distributed.device_communicators import shm_broadcast

    def init(self, is_reader, context=None, notify_address=None, busy_loop_s=1):
        self.is_reader, self.busy_loop_s = is_reader, busy_loop_s if is_reader else 0

    monkeypatch.setattr(shm_broadcast.SpinCondition, "__init__", init)
    monkeypatch.delattr(shm_broadcast.SpinCondition, "_pdserve_spin_limit", raising=False)
    return shm_broadcast.SpinCondition


def test_vllms_reader_spins_on_busy_loop_s():
    """The attribute the plugin sets is the one vLLM's wait() reads (fails when vLLM renames it)."""
    pytest.importorskip("vllm")
    from vllm.distributed.device_communicators import shm_broadcast

    assert "busy_loop_s" in inspect.signature(shm_broadcast.SpinCondition.__init__).parameters
    assert "self.busy_loop_s" in inspect.getsource(shm_broadcast.SpinCondition.wait)


def test_readers_spin_for_the_configured_time(spin_condition, monkeypatch):
    from pdserve.worker.vllm_plugin import SPIN_ENV, limit_shm_spin

    assert spin_condition(True).busy_loop_s == 1  # vLLM's own
    monkeypatch.setenv(SPIN_ENV, "0.05")
    limit_shm_spin()
    limit_shm_spin()  # once per process, however often vLLM loads the plugin
    assert spin_condition(True, None, "inproc://x").busy_loop_s == 0.05
    assert spin_condition(False).busy_loop_s == 0  # writers never spin


def test_unset_keeps_vllms_spin(spin_condition, monkeypatch):
    from pdserve.worker.vllm_plugin import SPIN_ENV, limit_shm_spin

    monkeypatch.delenv(SPIN_ENV, raising=False)
    limit_shm_spin()
    assert spin_condition(True).busy_loop_s == 1
