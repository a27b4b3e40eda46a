"""P -> D handoff through pdserve's KV connector on two real vLLM-CPU engines.

Two `AsyncLLM` engines (each with its own engine-core process, as in a
worker) run the demo model with `PDConnector` over the TCP transport; this
test plays the controller: it sends a request to D, takes D's reservation
from its reservation inbox, and sends the request to P with max_tokens=1.

The colocated reference is P itself serving the same prompts without
kv_transfer_params: a request with no params never touches the connector, so
that is one plain engine's output (and it saves a third 60 s start-up).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

vllm = pytest.importorskip("vllm")

from pdserve.kv_transfer.connector import EXTRA_KEY  # noqa: E402
from pdserve.kv_transfer.params import DecodeParams, Reservation  # noqa: E402
from pdserve.kv_transfer.reservations import ReservationInbox  # noqa: E402
from pdserve.shared.config import KVTransferConfig  # noqa: E402

MODEL = str(Path(__file__).resolve().parents[2] / "services" / "demo_model")
PROMPT_LENGTHS = [1, 2, 17, 200, 777, 1500]
MAX_TOKENS = 12
VOCAB = 4096


class StatsSink:
    """Sums the connector counters each engine reports in vLLM's scheduler stats."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.kv_usage = 0.0  # fraction of KV blocks in use after the latest step

    def factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    sink.kv_usage = scheduler_stats.kv_cache_usage
                stats = getattr(scheduler_stats, "kv_connector_stats", None) if scheduler_stats else None
                for key, value in (stats or {}).items():
                    if isinstance(value, (int, float)):
                        sink.totals[key] = sink.totals.get(key, 0) + value

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


class Engines:
    """P, D and the event loop they live on (a thread, so sync tests can drive them)."""

    def __init__(self) -> None:
        self.inbox = ReservationInbox("127.0.0.1")
        self.inbox.start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="engines-loop")
        self.thread.start()
        self.stats = {"prefill": StatsSink(), "decode": StatsSink()}
        self.engines: dict[str, Any] = {}

    def run(self, coro: Coroutine, timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        for role in ("prefill", "decode"):
            args = AsyncEngineArgs(
                model=MODEL, max_model_len=2048, kv_cache_memory_bytes=192 << 20, enforce_eager=True,
                seed=0, disable_log_stats=False,
                kv_transfer_config={
                    "kv_connector": "PDConnector", "kv_connector_module_path": "pdserve.kv_transfer.connector",
                    "kv_role": "kv_both", "engine_id": f"{role}-0", "kv_load_failure_policy": "recompute",
                    "kv_connector_extra_config": {EXTRA_KEY: KVTransferConfig(
                        transfer_timeout_s=60, bind_host="127.0.0.1").model_dump(mode="json")},
                })
            self.engines[role] = AsyncLLM.from_engine_args(args, stat_loggers=[self.stats[role].factory()])

    async def generate(self, role: str, prompt: list[int], max_tokens: int, request_id: str,
                       params: dict[str, Any] | None = None) -> Any:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                  extra_args={"kv_transfer_params": params} if params else None)
        final = None
        async for out in self.engines[role].generate(TokensPrompt(prompt_token_ids=prompt), sampling, request_id):
            final = out
        return final

    async def handoff(self, prompt: list[int], tid: str, max_tokens: int = MAX_TOKENS) -> tuple[Any, Any]:
        """The controller's part: D first, then P with D's reservation."""
        decode = asyncio.create_task(self.generate("decode", prompt, max_tokens, f"d-{tid}",
                                                   DecodeParams(tid, self.inbox.address).to_dict()))
        reservation = await self.take(tid, 120.0)
        prefill = await self.generate("prefill", prompt, 1, f"p-{tid}", reservation.prefill_params())
        return prefill, await decode

    async def take(self, tid: str, timeout_s: float) -> Reservation:
        deadline = time.monotonic() + timeout_s
        while (found := self.inbox.poll(tid)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reservation for {tid} within {timeout_s}s")
            await self.inbox.wait(tid, 1.0)
        return found

    def shutdown(self) -> None:
        self.inbox.close()
        for engine in self.engines.values():
            engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Iterator[Engines]:
    eng = Engines()
    started = time.monotonic()
    try:
        eng.run(eng.start())
        print(f"\nengines started in {time.monotonic() - started:.1f}s")
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def reference(engines: Engines) -> dict[int, list[int]]:
    """Colocated greedy output of each prompt (P without any transfer params)."""
    async def all_refs() -> dict[int, list[int]]:
        outs = await asyncio.gather(*(engines.generate("prefill", _prompt(n, n), MAX_TOKENS, f"ref-{n}")
                                      for n in PROMPT_LENGTHS))
        return {n: list(o.outputs[0].token_ids) for n, o in zip(PROMPT_LENGTHS, outs)}
    return engines.run(all_refs())


def test_handoff_output_equals_colocated(engines: Engines, reference: dict[int, list[int]]) -> None:
    before = dict(engines.stats["decode"].totals)

    async def all_handoffs():
        return await asyncio.gather(*(engines.handoff(_prompt(n, n), f"t{n}") for n in PROMPT_LENGTHS))

    started = time.monotonic()
    results = engines.run(all_handoffs())
    print(f"\n{len(results)} handoffs in {time.monotonic() - started:.1f}s")
    for n, (prefill, decode) in zip(PROMPT_LENGTHS, results):
        assert list(prefill.outputs[0].token_ids) == reference[n][:1], f"P's first token, prompt of {n}"
        assert list(decode.outputs[0].token_ids) == reference[n], f"D's output, prompt of {n}"
        # D computed only the last prompt token: the rest came over the wire.
        assert decode.num_cached_tokens == max(n - 1, 0), f"prompt of {n}: D cached {decode.num_cached_tokens}"
    time.sleep(1.5)  # let the stat loggers see the last interval
    received = engines.stats["decode"].totals.get("recv_done", 0) - before.get("recv_done", 0)
    assert received == sum(1 for n in PROMPT_LENGTHS if n > 1)
    assert engines.stats["decode"].totals.get("recv_failed", 0) == before.get("recv_failed", 0)


def test_failed_handoff_recomputes_on_decode(engines: Engines, reference: dict[int, list[int]]) -> None:
    """No prefill ever sends: D times out, recomputes the prompt, still answers right, and counts it."""
    prompt = _prompt(300, 9001)  # a prompt D has never seen: no prefix-cache hit can hide a recompute
    before = engines.stats["decode"].totals.get("recv_failed", 0)

    async def orphan():
        expected = await engines.generate("prefill", prompt, MAX_TOKENS, "ref-orphan")
        params = DecodeParams("orphan", engines.inbox.address, timeout_s=2.0).to_dict()
        task = asyncio.create_task(engines.generate("decode", prompt, MAX_TOKENS, "d-orphan", params))
        reservation = await engines.take("orphan", 60.0)
        assert reservation.decode_block_ids  # D did reserve blocks and waited for them
        return expected, await task

    expected, decode = engines.run(orphan())
    assert list(decode.outputs[0].token_ids) == list(expected.outputs[0].token_ids)
    assert decode.num_cached_tokens == 0  # nothing arrived: D computed the whole prompt
    time.sleep(1.5)
    assert engines.stats["decode"].totals.get("recv_failed", 0) == before + 1


def test_decode_abort_while_waiting_frees_both_sides(engines: Engines, reference: dict[int, list[int]]) -> None:
    """D's request is aborted while its KV is on the way: P's send ends and P's blocks come back."""
    n = 777
    send_failed = engines.stats["prefill"].totals.get("send_failed", 0)

    async def aborted():
        params = DecodeParams("aborted", engines.inbox.address).to_dict()
        task = asyncio.create_task(engines.generate("decode", _prompt(n, n + 1), MAX_TOKENS, "d-aborted", params))
        reservation = await engines.take("aborted", 60.0)
        await engines.engines["decode"].abort("d-aborted")
        task.cancel()
        prefill = await engines.generate("prefill", _prompt(n, n + 1), 1, "p-aborted", reservation.prefill_params())
        # Both engines stay healthy: a later handoff still works.
        after = await engines.handoff(_prompt(300, 9002), "after-abort")
        expected = await engines.generate("prefill", _prompt(300, 9002), MAX_TOKENS, "ref-after-abort")
        return prefill, after, expected

    prefill, (_, decode), expected = engines.run(aborted())
    assert len(prefill.outputs[0].token_ids) == 1  # P still answers its first token
    assert list(decode.outputs[0].token_ids) == list(expected.outputs[0].token_ids)
    assert decode.num_cached_tokens == 299
    time.sleep(1.5)
    assert engines.stats["prefill"].totals.get("send_failed", 0) == send_failed + 1  # the aborted one
    # Nothing leaked: with every request done, neither engine holds a block.
    assert engines.stats["prefill"].kv_usage == 0.0 and engines.stats["decode"].kv_usage == 0.0
