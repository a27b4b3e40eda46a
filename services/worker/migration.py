"""A decode instance's part in live migration: engine-core utilities, the worker's calls, the clients' ops.

Lifecycle of one stop-and-copy migration of request X from S to T, seen from
the instances (the router's coordinator, `router.migration`, drives it):

  S: `migrate_stop(X)`   the engine-core utility `pdserve_migrate_stop`
                         holds X's blocks and finishes X in the scheduler
                         (between two steps, so no token is half made);
                         answers X's prompt and output token ids.
  T: generate(prompt + outputs, "KV comes from elsewhere", remaining
     max_tokens, `GENERATOR_STEPS_KEY` = outputs so far)
                         T reserves blocks and posts a reservation.
  S: `migrate_send(X, reservation)`   S pushes X's blocks into T's; then
                         frees them (when the send ends, either way).
  T: lands the KV, computes the last token, decodes on.
  S: `migrate_release(X)` instead of the send when T never reserved; the
                         router resumes X on S from its token ids.

Seeded sampling: vLLM's CPU sampler draws one number per sampling step from
a seeded request's generator. T's generator starts from the seed, so T
advances it by the steps S already sampled (`GENERATOR_STEPS_KEY`) before
its first sample; the migrated request then samples what it would have.

`MigrationOps` is what the coordinator calls on an instance: over Ray for a
real worker, in-process for the fake engine (`FakeMigratable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any, AsyncIterator, Protocol

from pdserve.kv_transfer.errors import TransferError
from pdserve.kv_transfer.migration import MigrationError, StoppedRequest
from pdserve.kv_transfer.params import DecodeParams, Reservation
from pdserve.shared.protocol import FIRST_TOKEN_KEY, EngineRequest, OutputDelta
from pdserve.worker.fake_engine import FakeEngineClient

log = logging.getLogger(__name__)

MIGRATE_STOP, MIGRATE_SEND, MIGRATE_RELEASE = "pdserve_migrate_stop", "pdserve_migrate_send", "pdserve_migrate_release"
# SamplingParams.extra_args: the request continues one that already sampled this many tokens elsewhere.
GENERATOR_STEPS_KEY = "pdserve_generator_steps"
_PATCHED = "_pdserve_generator_steps"


# ==== in the engine-core process ===============================================================
def _scheduler_side(core: Any) -> Any:
    connector = core.scheduler.get_kv_connector()
    side = getattr(connector, "scheduler_side", None)
    if side is None:
        raise MigrationError("this instance has no pdserve KV connector: it cannot migrate requests out")
    return side


def _stop(self: Any, req_id: str) -> dict[str, Any]:
    """Utility: hold `req_id`'s blocks, finish it, answer its tokens (or {"error": ...})."""
    from vllm.v1.request import RequestStatus

    try:
        side = _scheduler_side(self)
        request = self.scheduler.requests.get(req_id)
        if request is None:
            raise MigrationError(f"request {req_id} is not in the scheduler")
        stopped = side.migration.stop(request)
    except MigrationError as exc:
        return {"error": str(exc)}
    self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)
    return stopped.to_dict()


def _send(self: Any, req_id: str, reservation: dict) -> dict[str, Any]:
    """Utility: push held `req_id`'s blocks into the target's reservation."""
    try:
        _scheduler_side(self).migrate_send(req_id, Reservation.from_dict(reservation))
    except TransferError as exc:  # MigrationError, ParamsError: nothing was queued
        return {"error": str(exc)}
    return {}


def _release(self: Any, req_id: str) -> dict[str, Any]:
    """Utility: free held `req_id`'s blocks with no send."""
    try:
        released = _scheduler_side(self).migrate_release(req_id)
    except MigrationError as exc:
        return {"error": str(exc)}
    return {"released": released}


def add_migration_utilities() -> None:
    from vllm.v1.engine.core import EngineCore

    for name, fn in ((MIGRATE_STOP, _stop), (MIGRATE_SEND, _send), (MIGRATE_RELEASE, _release)):
        if not hasattr(EngineCore, name):
            setattr(EngineCore, name, fn)


def _advance(generator: Any, steps: int, fp64: bool, vocab: int) -> None:
    """Draw what `steps` sampling steps of vLLM's CPU sampler draw from a seeded request's generator."""
    import torch

    for _ in range(steps):
        if fp64:  # the native path: one exponential per vocabulary entry
            torch.empty(vocab, dtype=torch.float64).exponential_(generator=generator)
        else:  # the fused Gumbel path: one seed per step
            torch.randint(0, 2**31, (1,), generator=generator, dtype=torch.long)


def patch_generator_steps() -> None:
    """CPU model runner: a migrated seeded request's generator resumes where the source left it."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, _PATCHED, False):
        return
    update = CPUModelRunner._update_states

    def _update_states(self, scheduler_output: Any) -> Any:
        result = update(self, scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            steps = int(((params.extra_args or {}) if params else {}).get(GENERATOR_STEPS_KEY) or 0)
            state = self.requests.get(new.req_id)
            if steps > 0 and state is not None and state.generator is not None:
                sampler = getattr(self.sampler, "topk_topp_sampler", None)
                _advance(state.generator, steps, bool(getattr(sampler, "use_fp64_gumbel", False)),
                         self.input_batch.vocab_size)
        return result

    CPUModelRunner._update_states = _update_states
    setattr(CPUModelRunner, _PATCHED, True)


# ==== in the worker actor (EngineWorker delegates here) ========================================
def internal_id(engine: Any, request_id: str) -> str:
    """The engine core's id of the worker's request (vLLM suffixes the one it was given)."""
    ids = list(engine.output_processor.external_req_ids.get(request_id, ()))
    if len(ids) != 1:
        raise MigrationError(f"request {request_id} is not running here as one request ({len(ids)} found)")
    return ids[0]


async def worker_call(engine: Any, held: dict[str, str], method: str, request_id: str, *args: Any) -> dict:
    """Call a migration utility for the worker's `request_id`; {"error": ...} instead of raising."""
    if engine is None:
        return {"error": "the engine is not running"}
    try:
        # After the stop the worker may have closed the request's stream (and vLLM forgotten its id).
        core_id = held.get(request_id) if method != MIGRATE_STOP else None
        core_id = core_id or internal_id(engine, request_id)
    except MigrationError as exc:
        return {"error": str(exc)}
    answer = await engine.engine_core.call_utility_async(method, core_id, *args)
    if method == MIGRATE_STOP and "error" not in answer:
        held[request_id] = core_id
    elif method != MIGRATE_STOP:
        held.pop(request_id, None)
    return answer


# ==== on the router's side ======================================================================
class MigrationOps(Protocol):
    """What the coordinator asks of one instance."""

    async def stop(self, request_id: str) -> StoppedRequest: ...

    async def send(self, request_id: str, reservation: Reservation) -> None: ...

    async def release(self, request_id: str) -> bool: ...


def _checked(answer: dict) -> dict:
    if "error" in answer:
        raise MigrationError(answer["error"])
    return answer


def _stopped(answer: dict, request_id: str) -> StoppedRequest:
    a = _checked(answer)
    return StoppedRequest(request_id, list(a["prompt_token_ids"]), list(a["output_token_ids"]),
                          int(a["num_computed_tokens"]))


class RayMigrationOps:
    """Over Ray, to an `EngineWorker` actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def stop(self, request_id: str) -> StoppedRequest:
        return _stopped(await self.actor.migrate_stop.remote(request_id), request_id)

    async def send(self, request_id: str, reservation: Reservation) -> None:
        _checked(await self.actor.migrate_send.remote(request_id, reservation.to_dict()))

    async def release(self, request_id: str) -> bool:
        return bool(_checked(await self.actor.migrate_release.remote(request_id)).get("released"))


def migration_ops(client: Any) -> MigrationOps:
    """The ops of an engine client (a Ray worker's, or a `FakeMigratable`)."""
    if isinstance(client, FakeMigratable):
        return client
    actor = getattr(client, "actor", None)
    if actor is None:
        raise MigrationError(f"instance {client.instance_id} cannot migrate requests")
    return RayMigrationOps(actor)


@dataclasses.dataclass
class FakeMigratable(FakeEngineClient):
    """The fake engine, migratable: a stopped stream yields nothing more, a migrated one goes on.

    Its tokens are a function of the whole sequence, so a request migrated any
    number of times yields the unmigrated tokens.
    `held` are requests whose blocks wait for a send (leak checks).
    """

    held: set[str] = dataclasses.field(default_factory=set)
    refuse_stop: bool = False  # stop() fails (the request is mid-prefill, say)
    _emitted: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    _stopped: dict[str, asyncio.Event] = dataclasses.field(default_factory=dict)

    def token_at(self, prompt: list[int], choice: int, position: int) -> int:
        """A function of the whole sequence, as a real model's next token is: a continuation on
        prompt + generated (a migration's, or a recovery's) yields what the unbroken run yields."""
        seq = list(prompt)
        for _ in range(position + 1):
            seq.append(10 + (seq[-1] * 31 + len(seq) * 7 + 7 * choice) % (self.vocab_size - 10))
        return seq[-1]

    async def generate(self, request: EngineRequest) -> AsyncIterator[OutputDelta]:
        rid = request.request_id
        emitted = self._emitted.setdefault(rid, [])
        stopped = self._stopped.setdefault(rid, asyncio.Event())
        try:
            async with contextlib.aclosing(super().generate(request)) as stream:
                async for delta in stream:
                    if stopped.is_set():
                        break
                    emitted.extend(delta.token_ids)
                    yield delta
            if stopped.is_set():
                await asyncio.Event().wait()  # a stopped request's stream stays open, silent, until closed
        finally:
            self._emitted.pop(rid, None)
            self._stopped.pop(rid, None)

    async def stop(self, request_id: str) -> StoppedRequest:
        if self.dead:
            raise MigrationError(f"instance {self.instance_id} is dead")
        emitted = self._emitted.get(request_id)
        if self.refuse_stop or not emitted or request_id not in self.in_flight:
            raise MigrationError(f"request {request_id} is not decoding here")
        self._stopped[request_id].set()
        self.held.add(request_id)
        prompt = next(r.prompt_token_ids for r in reversed(self.submitted) if r.request_id == request_id)
        return StoppedRequest(request_id, list(prompt), list(emitted), len(prompt) + len(emitted) - 1)

    async def send(self, request_id: str, reservation: Reservation) -> None:
        if request_id not in self.held:
            raise MigrationError(f"request {request_id} is not held here")
        self.held.discard(request_id)
        if self.kv_fabric is not None:  # the target's "KV landed"
            self.kv_fabric.setdefault(reservation.transfer_id, asyncio.Event()).set()

    async def release(self, request_id: str) -> bool:
        if request_id not in self.held:
            return False
        self.held.discard(request_id)
        return True


def target_params(params: Any, prompt_len: int, stopped: StoppedRequest, transfer_id: str, reply_to: str | None,
                  timeout_s: float) -> Any:
    """The target's sampling params: what is left of the request (`params`: its original ones), KV from S.

    `prompt_len` is the original prompt's length: the rest of the source's prompt is output an
    earlier migration moved, and counts as sampled (max_tokens, min_tokens, the generator).
    """
    done = len(stopped.prompt_token_ids) - prompt_len + len(stopped.output_token_ids)
    clone = params.clone()
    clone.max_tokens = max((params.max_tokens or 0) - done, 1)
    clone.min_tokens = max((params.min_tokens or 0) - done, 0)
    clone.prompt_logprobs = None
    extra = dict(params.extra_args or {})
    extra.pop(FIRST_TOKEN_KEY, None)  # the first token was the first instance's business
    extra["kv_transfer_params"] = DecodeParams(transfer_id, reply_to, timeout_s).to_dict()
    extra[GENERATOR_STEPS_KEY] = done
    clone.extra_args = extra
    return clone


def resume_params(params: Any, prompt_len: int, stopped: StoppedRequest) -> Any:
    """Params to resubmit a stopped request with no transfer (the target never took it): recompute."""
    clone = target_params(params, prompt_len, stopped, "", None, 0.0)
    clone.extra_args.pop("kv_transfer_params", None)
    return clone
