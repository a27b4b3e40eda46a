"""The operator's HTTP surface: the live instance registry and scaling.

Lifecycle: `GET /admin/instances` lists every registered instance with its
state (starting ones as counts per role); `POST /admin/scale` with
`{"prefill": N, "decode": M, "mixed": K}` (any subset) plans the change and
answers 202 at once with what will be added and removed; instances join when
their engines are up and leave after draining. `POST /admin/drain` with
`{"instances": [ids], "replace": false}` drains exactly the named instances
(a node or pod going away; `replace` starts as many elsewhere). Guarded by the API key like
`/v1/`. `pdserve scale` is the command-line client of these routes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pdserve.shared.errors import InvalidRequestError
from pdserve.shared.roles import Role

if TYPE_CHECKING:
    from pdserve.gateway.app import GatewayState


class ScaleRequest(BaseModel):
    """Instance counts to reach; a role left out keeps its count."""

    model_config = ConfigDict(extra="forbid")

    prefill: int | None = Field(None, ge=0, description="Prefill instances wanted.")
    decode: int | None = Field(None, ge=0, description="Decode instances wanted.")
    mixed: int | None = Field(None, ge=0, description="Mixed (colocated) instances wanted.")

    def targets(self) -> dict[Role, int]:
        return {Role(name): count for name, count in self.model_dump().items() if count is not None}


class DrainRequest(BaseModel):
    """Instances to drain and remove by name (a node or pod going away)."""

    model_config = ConfigDict(extra="forbid")

    instances: list[str] = Field(..., min_length=1, description="Instance ids, as GET /admin/instances lists them.")
    replace: bool = Field(False, description="Start as many instances of each role elsewhere (keep pool sizes).")


def instances_view(state: GatewayState) -> dict:
    router = state.router
    instances = []
    for stats in router.latest_stats():
        client = router.clients.get(stats.instance_id)
        instances.append({**{k: v for k, v in dataclasses.asdict(stats).items() if k != "kv_transfer"},
                          "state": stats.state.value, "role": stats.role.value,
                          "node_ip": client.info.node_ip if client else "",
                          "kv_host": client.info.kv_host if client else None})
    scaler = state.scaler
    starting = {role.value: n for role, n in (scaler.starting if scaler else {}).items() if n}
    return {"instances": instances, "starting": starting,
            "scaling": dict(scaler.counters) if scaler else None}


def install_admin_routes(app: FastAPI, state: GatewayState) -> None:
    from pdserve.gateway.app import parse_body

    @app.get("/admin/instances")
    async def instances() -> JSONResponse:
        return JSONResponse(instances_view(state))

    @app.post("/admin/scale")
    async def scale(request: Request) -> JSONResponse:
        if state.scaler is None:
            raise InvalidRequestError("this server cannot scale (it was built without an instance factory)")
        body: ScaleRequest = await parse_body(request, ScaleRequest)
        plan = await state.scaler.scale(body.targets())
        return JSONResponse({"plan": plan.to_dict(), **instances_view(state)}, status_code=202)

    @app.post("/admin/drain")
    async def drain(request: Request) -> JSONResponse:
        if state.scaler is None:
            raise InvalidRequestError("this server cannot drain (it was built without an instance factory)")
        body: DrainRequest = await parse_body(request, DrainRequest)
        plan = await state.scaler.drain(body.instances, body.replace)
        return JSONResponse({"plan": plan.to_dict(), **instances_view(state)}, status_code=202)
