"""deploy/grafana: every PromQL in the dashboard names a metric the gateway's /metrics exports.

The gateway is the real app on the in-tree fake engine (no vLLM), serving one request first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pdserve.gateway.app import GatewayState, create_app
from pdserve.gateway.model import ServedModel
from pdserve.gateway.server import GatewayServer
from pdserve.router.controller import Router
from pdserve.router.registry import make_policy
from pdserve.shared.metrics import Metrics
from pdserve.worker.fake_engine import FakeEngineClient

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "pdserve-dashboard.json"
METRIC = re.compile(r"\bpdserve:[a-zA-Z0-9_:]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}


@pytest.fixture(scope="module")
def metrics_text(demo_model_dir) -> str:
    model = ServedModel.load("demo", str(demo_model_dir), 256)
    engines = [FakeEngineClient.make(instance_id=f"fake-{i}", max_model_len=256, detokenize=model.decode)
               for i in range(2)]
    metrics = Metrics("demo")
    router = Router(engines, make_policy("least_loaded"), on_stats=metrics.observe_instance)
    server = GatewayServer(create_app(GatewayState(model, router, metrics, stats_interval_s=0.05)),
                           "127.0.0.1", 0, log_level="warning")
    url = server.start_in_thread()
    try:
        reply = httpx.post(f"{url}/v1/completions", timeout=30,
                           json={"model": "demo", "prompt": "Open a file", "max_tokens": 5, "stream": True})
        assert reply.status_code == 200
        return httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        server.stop()


def _exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Series names /metrics exports (from each family's type), and `le` bounds per histogram."""
    names: set[str] = set()
    bounds: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        for sample in family.samples:
            names.add(sample.name)
            if sample.name.endswith("_bucket"):
                bounds.setdefault(sample.name, set()).add(sample.labels["le"])
    return names, bounds


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside a collapsed row (which Grafana keeps under the row's own `panels`) too."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    out = [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]
    out += [(v["name"], v["definition"]) for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return out


def test_dashboard_is_valid_json_with_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in _panels(dashboard) if p["type"] != "row"]
    for want in ("Time to first token", "Time per output token", "Inter-token latency", "SLO attainment",
                 "Goodput (estimate)", "KV bytes sent per second", "KV transfer time per handoff",
                 "Waiting requests", "KV-cache use per pool", "Goodput (requests meeting their own SLO)",
                 "SLO attainment per class (since start)", "Refused requests (429) by reason",
                 "Admission queue depth"):
        assert want in titles
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    # Every graph queries Prometheus: no panel is left without PromQL for the /metrics check below.
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']}: no query"
            assert all(t.get("expr", "").strip() for t in panel["targets"]), f"{panel['title']}: a target without expr"


def test_every_promql_names_an_exported_metric(metrics_text):
    exported, _ = _exported(metrics_text)
    assert "pdserve:time_to_first_token_seconds_bucket" in exported  # the parse saw the gateway's metrics
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for title, expr in _exprs(dashboard):
        names = set(METRIC.findall(expr))
        assert names, f"{title}: {expr!r} names no pdserve metric"
        assert names <= exported, f"{title}: {sorted(names - exported)} not in /metrics"
        used |= names
        if expr.startswith("histogram_quantile"):
            assert all(n.endswith("_bucket") for n in names), f"{title}: quantiles come from _bucket series"
    # TTFT, TPOT, ITL percentiles, KV bytes, queues and KV use per pool are all on the board.
    for name in ("time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "kv_transfer_bytes", "kv_transfer_seconds",
                 "num_requests_waiting", "kv_cache_usage_perc", "slo_requests_total", "slo_attainment",
                 "rejections_total", "admission_queue_depth", "ttft_prediction_ratio_bucket"):
        assert f"pdserve:{name}" in used


def test_slo_choices_are_bucket_bounds(metrics_text):
    _, bounds = _exported(metrics_text)
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    for var, hist in (("slo_ttft", "time_to_first_token_seconds"), ("slo_tpot", "time_per_output_token_seconds")):
        choices = {o["value"] for o in variables[var]["options"]}
        assert choices <= bounds[f"pdserve:{hist}_bucket"], f"${var}: not all are `le` values of {hist}"


def test_prometheus_config_scrapes_the_gateway():
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pdserve"]
    assert job["metrics_path"] == "/metrics"


def _declared_in_source() -> set[str]:
    """`pdserve:` metric names declared as string literals in the project's code (services/, shared/)."""
    declared = set()
    for folder in ("services", "shared"):
        for path in (REPO / folder).rglob("*.py"):
            declared.update(re.findall(r"""["'](pdserve:[a-zA-Z0-9_:]+)["']""", path.read_text()))
    return declared


def _family(series: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def test_every_dashboard_metric_is_declared_in_the_code():
    # Beside the live /metrics check: names where a rename in the code would surface, with no server.
    declared = _declared_in_source()
    assert "pdserve:time_to_first_token_seconds" in declared
    dashboard = json.loads(DASHBOARD.read_text())
    for title, expr in _exprs(dashboard):
        for series in METRIC.findall(expr):
            assert _family(series) in declared, f"{title}: {series} is declared nowhere in services/ or shared/"
