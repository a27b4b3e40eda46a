"""Migration out of a decode instance, at the connector (no engine): hold, send from stored blocks, release.

The scheduler side is driven with the fakes of test_kv_connector; the worker
sides run over the loopback transport, so the push from a stopped request's
blocks into a target's reserved blocks is a real transfer.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from pdserve.kv_transfer.connector_meta import LoadSpec, PDConnectorMetadata
from pdserve.kv_transfer.connector_scheduler import PDSchedulerSide
from pdserve.kv_transfer.first_token import FIRST_TOKENS
from pdserve.kv_transfer.loopback import LoopbackFabric
from pdserve.kv_transfer.migration import MigrationError
from pdserve.kv_transfer.params import Reservation
from test_kv_connector import BS, LAYERS, FakeManager, FakeRequest, sched_output, wait_results, worker

RUNNING = SimpleNamespace(name="RUNNING")
ABORTED = SimpleNamespace(name="FINISHED_ABORTED")


def _running(rid: str = "x", prompt: int = 9, outputs: int = 3) -> FakeRequest:
    req = FakeRequest(rid, list(range(prompt)), None, status=RUNNING,
                      output_token_ids=list(range(100, 100 + outputs)))
    req.num_computed_tokens = prompt + outputs - 1
    return req


def _source(tables: dict[str, list[int]], timeout: float = 9.0) -> PDSchedulerSide:
    side = PDSchedulerSide(block_size=BS, poster=None, transfer_timeout_s=timeout)
    side.kv_cache_manager = FakeManager(tables)
    return side


def _stop(side: PDSchedulerSide, req: FakeRequest):
    stopped = side.migration.stop(req)
    req.status = ABORTED  # what vLLM's finish_requests does next
    return stopped, side.request_finished(req, [])


def test_stop_holds_the_blocks_and_answers_the_tokens() -> None:
    side = _source({"x": [4, 5, 6]})
    stopped, finished = _stop(side, _running())
    assert finished == (True, None)  # vLLM keeps the blocks
    assert (stopped.prompt_token_ids, stopped.output_token_ids, stopped.num_computed_tokens) == (
        list(range(9)), [100, 101, 102], 11)
    assert side.has_pending_push_work()


def test_stop_refuses_what_is_not_decoding() -> None:
    side = _source({})
    with pytest.raises(MigrationError):
        side.migration.stop(FakeRequest("w", [1, 2], None, status=SimpleNamespace(name="WAITING")))
    prefilling = _running()
    prefilling.num_computed_tokens = 4  # mid-prefill: the KV does not match the tokens
    with pytest.raises(MigrationError):
        side.migration.stop(prefilling)
    running = _running()
    side.migration.stop(running)
    with pytest.raises(MigrationError):
        side.migration.stop(running)  # twice


def test_send_pushes_the_computed_blocks_past_the_targets_prefix_hit() -> None:
    side = _source({"x": [4, 5, 6]})
    _stop(side, _running())
    with pytest.raises(MigrationError):  # a target expecting another token count
        side.migrate_send("x", Reservation("m1", [{"instance_id": "t"}], [7, 8], 10, 0))
    side.migrate_send("x", Reservation("m1", [{"instance_id": "t"}], [7, 8], 11, 1))
    meta = side.build_connector_meta(sched_output())
    assert [(s.req_id, s.transfer_id, s.local_block_ids, s.remote_block_ids, s.skipped_blocks)
            for s in meta.migrations] == [("x", "m1", [5, 6], [7, 8], 1)]
    with pytest.raises(MigrationError):
        side.migrate_send("x", Reservation("m1", [{}], [7, 8], 11, 1))  # sent already
    assert side.migrate_release("x") is False
    side.update_connector_output(SimpleNamespace(finished_sending={"x"}))
    assert not side.has_pending_push_work()


def test_release_and_an_expired_hold_free_the_blocks() -> None:
    side = _source({"x": [4, 5, 6], "y": [1]}, timeout=0.05)
    _stop(side, _running("x"))
    _stop(side, _running("y", prompt=2, outputs=1))
    assert side.migrate_release("x") is True
    time.sleep(0.06)
    meta = side.build_connector_meta(sched_output())
    assert sorted(meta.releases) == ["x", "y"] and side.migration.counters["hold_expired"] == 1
    side.update_connector_output(SimpleNamespace(finished_sending={"x", "y"}))
    assert not side.has_pending_push_work()


def test_worker_sends_stored_blocks_into_the_targets_and_frees_both_ways() -> None:
    fabric = LoopbackFabric()
    source, s_caches = worker("decode-0", fabric, seed=10)
    target, t_caches = worker("decode-1", fabric, seed=60)
    try:
        side = _source({"x": [1, 2, 3]})
        _stop(side, _running("x", prompt=9, outputs=3))  # 11 computed tokens: 3 blocks of 4
        target.bind(PDConnectorMetadata(loads=[LoadSpec("x-m1", "m1", [9, 0, 5], 5.0)]))
        side.migrate_send("x", Reservation("m1", [target.transport.endpoint.to_dict()], [9, 0, 5], 11))
        source.bind(side.build_connector_meta(sched_output()))  # no forward: the blocks go at once
        _, recving, failed = wait_results(target, set(), "recv")
        assert recving == {"x-m1"} and failed == set()
        assert FIRST_TOKENS.get("m1") is None  # the target samples on its own
        for layer in range(LAYERS):
            for s, t in [(1, 9), (2, 0), (3, 5)]:
                assert torch.equal(t_caches[layer][t], s_caches[layer][s])
        sending, _, _ = wait_results(source, set(), "send")  # finished already: no finished_req_ids needed
        assert sending == {"x"}
        counters = source.take_counters()
        assert counters["migrate_sent"] == 1 and counters["send_done"] == 1 and counters["migrate_bytes"] > 0
        # A release is reported as finished sending, so vLLM frees the held blocks.
        source.bind(PDConnectorMetadata(releases=["y"]))
        assert source.transfer_results(set())[0] == {"y"}
    finally:
        source.shutdown()
        target.shutdown()


@pytest.mark.parametrize("fp64", [False, True])
def test_advancing_a_seeded_generator_resumes_vllms_cpu_sampler_where_it_was(fp64: bool) -> None:
    """The target's generator, advanced by the steps the source sampled, samples what the source would."""
    pytest.importorskip("vllm")
    import vllm._custom_ops  # noqa: F401 - registers the CPU sampler's fused kernel
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from pdserve.worker.migration import _advance

    sampler = TopKTopPSampler()
    sampler.use_fp64_gumbel = fp64
    logits = torch.randn(1, 512, generator=torch.Generator().manual_seed(0))

    def sample(generator: torch.Generator) -> int:
        return int(sampler.forward_cpu(logits.clone(), {0: generator}, None, None)[0][0])

    source = torch.Generator().manual_seed(7)
    unmoved = [sample(source) for _ in range(8)]
    target = torch.Generator().manual_seed(7)
    _advance(target, 5, fp64, 512)
    assert [sample(target) for _ in range(3)] == unmoved[5:]
    fresh = torch.Generator().manual_seed(7)
    assert [sample(fresh) for _ in range(3)] != unmoved[5:]  # without the catch-up it differs
