"""The OpenAI-compatible HTTP surface (FastAPI).

Lifecycle of an HTTP request: auth -> JSON parsed and validated against
vLLM's OpenAI request models -> model name checked -> SLO and priority
resolved (headers, extension fields, config defaults) -> endpoint handler
(completions.py, chat.py) -> response or SSE stream. Every failure leaves as
`{"error": {"message", "type", "param", "code"}}` with its HTTP status (a 429
from admission control carries Retry-After); the gateway holds no placement
logic (that is the router's).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve import __version__
from pdserve.gateway.handler import as_invalid_request, client_errors
from pdserve.gateway.model import ServedModel
from pdserve.gateway.sse import error_body
from pdserve.gateway.admin import install_admin_routes
from pdserve.gateway.slo import request_slo
from pdserve.router.controller import Router
from pdserve.router.scaling import Scaler
from pdserve.shared.errors import AuthenticationError, InvalidRequestError, ModelNotFoundError, PdserveError
from pdserve.shared.metrics import Metrics
from pdserve.shared.slo_config import SloRoutingConfig
from pdserve.shared.slo_metrics import SloMetrics

logger = logging.getLogger(__name__)


@dataclass
class GatewayState:
    model: ServedModel
    router: Router
    metrics: Metrics
    api_key: str | None = None
    stats_interval_s: float = 0.5
    scaler: Scaler | None = None  # adds and removes instances while serving (`/admin/scale`)
    slo: SloRoutingConfig = field(default_factory=SloRoutingConfig)  # per-class defaults requests override
    slo_metrics: SloMetrics | None = None  # default: on the gateway's registry, fed by router and admission
    migration_interval_s: float | None = None  # run the router's migration policy this often (None: never)


def create_app(state: GatewayState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.router.refresh()
        state.router.start(state.stats_interval_s)
        policy = None
        if state.migration_interval_s is not None and state.router.migrator is not None:
            from pdserve.router.migration import run_policy

            policy = asyncio.create_task(run_policy(state.router, state.migration_interval_s))
        yield
        if policy is not None:
            policy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await policy
        if state.scaler is not None:
            await state.scaler.close()
        await state.router.close()

    if state.slo_metrics is None:
        state.slo_metrics = SloMetrics(state.model.name, state.metrics.registry, state.slo.prediction_log)
    state.router.observer = state.slo_metrics
    if state.router.admission is not None:
        state.router.admission.observer = state.slo_metrics
    app = FastAPI(title="pdserve", version=__version__, lifespan=lifespan)
    app.state.gateway = state
    _install_error_handlers(app)
    _install_auth(app, state.api_key)
    _install_routes(app, state)
    install_admin_routes(app, state)
    return app


def _error_response(exc: PdserveError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.error_type, int(exc.status), exc.param), status_code=int(exc.status),
                        headers=getattr(exc, "headers", None))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PdserveError)
    async def pdserve_error(request: Request, exc: PdserveError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
        return JSONResponse(error_body(str(exc.detail), error_type, exc.status_code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "InternalServerError", 500),
                            status_code=500)


def _install_auth(app: FastAPI, api_key: str | None) -> None:
    if not api_key:
        return

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if request.url.path.startswith(("/v1/", "/admin/")):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
                return _error_response(AuthenticationError("Incorrect or missing API key "
                                                           "(send 'Authorization: Bearer <key>')."))
        return await call_next(request)


async def parse_body(request: Request, model_cls: type) -> Any:
    """The request body as `model_cls`; malformed JSON and invalid fields are 400s."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequestError(f"{param or 'body'}: {first.get('msg')}", param=param or None) from exc
    except client_errors() as exc:  # validators in vLLM's models raise their own errors too
        raise as_invalid_request(exc) from exc


def _install_fault_routes(app: FastAPI, state: GatewayState) -> None:
    """Failure injection for tests (PDSERVE_FAULT_HOOKS=1 only): kill, freeze or thaw an instance's engine."""

    @app.post("/admin/faults/{fault}")
    async def inject(fault: str, request: Request) -> JSONResponse:
        body = await request.json()
        client = state.router.clients.get(str(body.get("instance_id")))
        if client is None:
            raise InvalidRequestError(f"no instance {body.get('instance_id')!r}", param="instance_id")
        try:
            pids = await client.inject_fault(fault)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="fault") from exc
        return JSONResponse({"instance_id": client.instance_id, "fault": fault, "pids": pids})


def _check_model(name: str | None, model: ServedModel) -> None:
    if name is not None and name != model.name:
        raise ModelNotFoundError(f"The model `{name}` does not exist.", param="model")


def _install_routes(app: FastAPI, state: GatewayState) -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

    from pdserve.gateway.chat import create_chat_completion
    from pdserve.gateway.completions import create_completion

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        _check_model(body.model, state.model)
        slo = request_slo(request.headers, body, state.slo)
        return await create_completion(body, request, state.model, state.router, state.metrics, slo,
                                       state.slo_metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        _check_model(body.model, state.model)
        slo = request_slo(request.headers, body, state.slo)
        return await create_chat_completion(body, request, state.model, state.router, state.metrics, slo,
                                            state.slo_metrics)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = ModelCard(id=state.model.name, owned_by="pdserve", root=state.model.name,
                         max_model_len=state.model.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.get("/health")
    async def health() -> Response:
        """200 while every role has a healthy instance ("degraded" if some instance is down); 503 otherwise."""
        stats = state.router.latest_stats()
        healthy = [s.instance_id for s in stats if s.healthy]
        down_roles = sorted({s.role.value for s in stats} - {s.role.value for s in stats if s.healthy})
        status = "unavailable" if down_roles else ("ok" if len(healthy) == len(stats) else "degraded")
        body = {"status": status, "healthy_instances": healthy, "roles_down": down_roles,
                "instances": [dataclasses.asdict(s) for s in stats]}
        return JSONResponse(jsonable_encoder(body), status_code=503 if down_roles else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.observe_handoffs(state.router.handoff_counters)
        state.metrics.observe_recoveries(state.router.recovery.counters)
        if state.scaler is not None:
            state.metrics.observe_scaling(state.scaler.counters)
        prefix = state.router.prefix
        if prefix is not None:
            state.metrics.observe_prefix_index(prefix.counters(), prefix.tokens, prefix.hit_tokens)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if os.environ.get("PDSERVE_FAULT_HOOKS") == "1":
        _install_fault_routes(app, state)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})
