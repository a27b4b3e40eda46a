"""A request's SLO and priority class, from its headers and body extension fields.

Headers `x-slo-ttft-ms`, `x-slo-tpot-ms`, `x-priority`; body fields `slo_ttft_ms`,
`slo_tpot_ms`, `slo_priority` (vLLM's request models keep unknown fields in `model_extra`;
`priority` itself is vLLM's scheduling priority, an integer, hence the prefix). A header wins
over its field; unset values come from the `slo` config's defaults for the request's class.
Bad values are 400s naming the header or field.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from pdserve.shared.errors import InvalidRequestError
from pdserve.shared.slo import Priority, RequestSlo
from pdserve.shared.slo_config import SloRoutingConfig

_MAX_MS = 24 * 3600 * 1000.0  # a target beyond a day is a typo, not a latency target
# (header, body field) per value
TTFT = ("x-slo-ttft-ms", "slo_ttft_ms")
TPOT = ("x-slo-tpot-ms", "slo_tpot_ms")
PRIORITY = ("x-priority", "slo_priority")


def request_slo(headers: Mapping[str, str], body: Any, config: SloRoutingConfig) -> RequestSlo:
    """The request's SLO; raises InvalidRequestError on a malformed or out-of-range value."""
    extra = getattr(body, "model_extra", None) or {}
    ttft = _milliseconds(*_lookup(headers, extra, TTFT))
    tpot = _milliseconds(*_lookup(headers, extra, TPOT))
    priority = _priority(*_lookup(headers, extra, PRIORITY))
    return config.resolve(ttft, tpot, priority)


def _lookup(headers: Mapping[str, str], extra: Mapping[str, Any], names: tuple[str, str]) -> tuple[Any, str]:
    header, field = names
    value = headers.get(header)
    if value is not None:
        return value, header
    return extra.get(field), field


def _milliseconds(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequestError(f"{name} must be a number of milliseconds, got {type(value).__name__}",
                                  param=name)
    try:
        ms = float(value)
    except ValueError:
        raise InvalidRequestError(f"{name} must be a number of milliseconds, got {value!r}", param=name) from None
    if not math.isfinite(ms) or not 0 < ms <= _MAX_MS:
        raise InvalidRequestError(f"{name} must be greater than 0 and at most {_MAX_MS:.0f} ms, got {value!r}",
                                  param=name)
    return ms


def _priority(value: Any, name: str) -> Priority | None:
    if value is None:
        return None
    choices = [p.value for p in Priority]
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise InvalidRequestError(f"{name} must be one of {choices}, got {value!r}", param=name)
    return Priority(value.strip().lower())
