"""The gateway against the in-tree fake engine: API surface, errors, disconnects, metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from pdserve.gateway.app import GatewayState, create_app
from pdserve.gateway.model import ServedModel
from pdserve.gateway.server import GatewayServer
from pdserve.router.controller import Router
from pdserve.router.registry import make_policy
from pdserve.shared.metrics import Metrics
from pdserve.worker.fake_engine import FakeEngineClient, FaultPlan

MODEL = "demo"
MAX_LEN = 256


@pytest.fixture(scope="module")
def served_model(demo_model_dir) -> ServedModel:
    return ServedModel.load(MODEL, str(demo_model_dir), MAX_LEN)


class Gateway:
    """A running gateway on a free port, backed by fake engines."""

    def __init__(self, model: ServedModel, engines: list[FakeEngineClient], api_key: str | None = None) -> None:
        self.engines = engines
        self.model = model
        self.metrics = Metrics(MODEL)
        router = Router(engines, make_policy("least_loaded"), on_stats=self.metrics.observe_instance,
                        on_restart=self.metrics.observe_restart)
        self.router = router
        app = create_app(GatewayState(model, router, self.metrics, api_key=api_key, stats_interval_s=0.05))
        self.server = GatewayServer(app, "127.0.0.1", 0, log_level="warning")
        self.url = self.server.start_in_thread()

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)


def _fake(model: ServedModel, **kwargs) -> FakeEngineClient:
    return FakeEngineClient.make(max_model_len=MAX_LEN, detokenize=model.decode, **kwargs)


@pytest.fixture()
def gateway(served_model):
    gw = Gateway(served_model, [_fake(served_model, instance_id="fake-0"), _fake(served_model, instance_id="fake-1")])
    yield gw
    gw.server.stop()


def _expected_text(engine: FakeEngineClient, model: ServedModel, prompt_ids: list[int], count: int,
                   choice: int = 0) -> str:
    return "".join(model.decode([engine.token_at(prompt_ids, choice, i)]) for i in range(count))


def test_completion_text_and_usage(gateway, served_model):
    prompt = "Return the sum of two numbers"
    out = gateway.client().completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0)
    ids = served_model.tokenizer.encode(prompt)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == len(ids) + 7
    assert out.choices[0].text == _expected_text(gateway.engines[0], served_model, ids, 7)
    assert out.choices[0].finish_reason == "length"


def test_completion_stream_matches_unary(gateway, served_model):
    client = gateway.client()
    unary = client.completions.create(model=MODEL, prompt="Open a file", max_tokens=9)
    chunks = list(client.completions.create(model=MODEL, prompt="Open a file", max_tokens=9, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == unary.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_and_unary(gateway, served_model):
    client = gateway.client()
    messages = [{"role": "user", "content": "What does json.dumps do?"}]
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6)
    expected_prompt = served_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert unary.usage.prompt_tokens == len(served_model.tokenizer.encode(expected_prompt, add_special_tokens=False))
    assert unary.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert {c.object for c in stream} == {"chat.completion.chunk"}
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == unary.choices[0].message.content
    assert stream[-1].usage.completion_tokens == 6


def test_n_and_multiple_prompts(gateway, served_model):
    out = gateway.client().completions.create(model=MODEL, prompt=["alpha", "beta gamma"], n=2, max_tokens=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12
    by_index = {c.index: c.text for c in out.choices}
    beta = served_model.tokenizer.encode("beta gamma")
    assert by_index[3] == _expected_text(gateway.engines[0], served_model, beta, 3, choice=1)


def test_logprobs_shapes(gateway):
    client = gateway.client()
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset[0] == 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 2 and len(content[0].top_logprobs) == 2


def _post(url: str, path: str, body, headers=None) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"content-type": "application/json", **(headers or {})},
                      timeout=30)


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    if param is not None:
        assert param in (error["param"] or ""), error
    return error


BAD_COMPLETIONS = [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, None),
    ({"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, None),
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 5}, 400, None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": [999999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "word " * 400, "max_tokens": 1}, 400, "prompt"),
    ({"model": "no-such-model", "prompt": "hi"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD_COMPLETIONS)
def test_completion_errors(gateway, body, status, param):
    _assert_error(_post(gateway.url, "/v1/completions", body), status, param)


BAD_CHATS = [
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}, 400,
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, None),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHATS)
def test_chat_errors(gateway, body, status, param):
    _assert_error(_post(gateway.url, "/v1/chat/completions", body), status, param)


def test_unknown_route_and_method(gateway):
    _assert_error(httpx.get(gateway.url + "/v1/nothing-here"), 404)
    _assert_error(httpx.get(gateway.url + "/v1/completions"), 405)


def test_bad_input_leaves_server_working(gateway):
    for body, _, _ in BAD_COMPLETIONS:
        _post(gateway.url, "/v1/completions", body)
    out = gateway.client().completions.create(model=MODEL, prompt="still fine", max_tokens=2)
    assert out.usage.completion_tokens == 2


def test_api_key(served_model):
    gw = Gateway(served_model, [_fake(served_model)], api_key="sekret")
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        _assert_error(_post(gw.url, "/v1/completions", body), 401)
        _assert_error(_post(gw.url, "/v1/completions", body, {"authorization": "Bearer wrong"}), 401)
        assert _post(gw.url, "/v1/completions", body, {"authorization": "Bearer sekret"}).status_code == 200
        assert gw.client(api_key="sekret").models.list().data[0].id == MODEL
        assert httpx.get(gw.url + "/health").status_code == 200  # probes need no key
    finally:
        gw.server.stop()


def test_engine_failure_mid_stream(served_model):
    engine = _fake(served_model, faults=FaultPlan(fail_after_tokens=3))
    gw = Gateway(served_model, [engine])
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 10, "stream": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 500 and "injected" in error["message"]
        unary = _post(gw.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10})
        _assert_error(unary, 500)
        engine.faults = FaultPlan()
        assert _post(gw.url, "/v1/completions", {"model": MODEL, "prompt": "hi"}).status_code == 200
        assert 'pdserve:requests_total{model_name="demo",outcome="error"} 2.0' in httpx.get(gw.url + "/metrics").text
    finally:
        gw.server.stop()


def test_dead_instance_fails_over(served_model):
    dying = _fake(served_model, instance_id="fake-0", faults=FaultPlan(die_after_tokens=1, restart_fails=True))
    healthy = _fake(served_model, instance_id="fake-1")
    gw = Gateway(served_model, [dying, healthy])
    gw.router._restart_backoff_s = 60.0  # one failed restart, then a long wait: the instance stays down
    try:
        # The instance dies after the first token: the request goes on on fake-1 (router.resume).
        first = _post(gw.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5})
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 5, first.text
        _wait_for(lambda: httpx.get(gw.url + "/health").json()["healthy_instances"] == ["fake-1"])
        assert httpx.get(gw.url + "/health").json()["status"] == "degraded"
        for _ in range(3):
            assert _post(gw.url, "/v1/completions", {"model": MODEL, "prompt": "hi"}).status_code == 200
        assert len(healthy.submitted) == 4  # the continuation, then the three
    finally:
        gw.server.stop()


async def test_client_disconnect_aborts(served_model):
    engine = _fake(served_model, faults=FaultPlan(token_interval_s=0.05))
    gw = Gateway(served_model, [engine])
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 200, "stream": True}
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", gw.url + "/v1/completions", json=body) as resp:
                lines = resp.aiter_lines()
                for _ in range(3):
                    await lines.__anext__()
                assert len(engine.in_flight) == 1
        for _ in range(100):  # the abort travels asynchronously
            if not engine.in_flight:
                break
            await asyncio.sleep(0.05)
        assert engine.in_flight == set()
        assert len(engine.aborted) == 1
        text = httpx.get(gw.url + "/metrics").text
        assert 'pdserve:requests_total{model_name="demo",outcome="aborted"} 1.0' in text
    finally:
        gw.server.stop()


async def test_unary_disconnect_aborts(served_model):
    engine = _fake(served_model, faults=FaultPlan(token_interval_s=0.05))
    gw = Gateway(served_model, [engine])
    try:
        async with httpx.AsyncClient(timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 200})
        for _ in range(100):
            if not engine.in_flight:
                break
            await asyncio.sleep(0.05)
        assert engine.in_flight == set() and len(engine.aborted) == 1
    finally:
        gw.server.stop()


def test_metrics_and_models(gateway):
    client = gateway.client()
    client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
    assert [m.id for m in client.models.list().data] == [MODEL]
    time.sleep(0.2)
    text = httpx.get(gateway.url + "/metrics").text
    assert 'pdserve:requests_total{model_name="demo",outcome="ok"} 1.0' in text
    assert 'pdserve:time_to_first_token_seconds_count{model_name="demo"} 1.0' in text
    assert 'pdserve:generation_tokens_total{model_name="demo"} 4.0' in text
    assert 'pdserve:num_requests_running{instance="fake-0",model_name="demo",role="mixed"}' in text


def test_dead_instance_shows_in_health_is_restarted_and_counted(served_model, monkeypatch):
    monkeypatch.setenv("PDSERVE_FAULT_HOOKS", "1")
    engines = [_fake(served_model, instance_id="fake-0")]
    gw = Gateway(served_model, engines)
    gw.router._restart_backoff_s = 0.05
    try:
        assert httpx.get(gw.url + "/health").json()["status"] == "ok"
        engines[0].faults = FaultPlan(restart_fails=True)  # restarts fail until the fault is lifted
        resp = httpx.post(gw.url + "/admin/faults/kill", json={"instance_id": "fake-0"})
        assert resp.status_code == 200, resp.text
        down = _wait_for(lambda: (h := httpx.get(gw.url + "/health")).status_code == 503 and h.json())
        assert down["roles_down"] == ["mixed"] and down["instances"][0]["state"] in ("dead", "restarting")
        # A request meanwhile is refused at once (no healthy instance), not left waiting.
        started = time.monotonic()
        refused = httpx.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and time.monotonic() - started < 1.0
        engines[0].faults = FaultPlan()
        back = _wait_for(lambda: (h := httpx.get(gw.url + "/health")).status_code == 200 and h.json())
        assert back["status"] == "ok" and back["instances"][0]["restarts"] == 1
        assert engines[0].restarts == 1
        assert 'pdserve:engine_restarts_total{instance="fake-0",model_name="demo",role="mixed"} 1.0' in \
            httpx.get(gw.url + "/metrics").text
        ok = httpx.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
        # Fault routes refuse bad input in the OpenAI error format.
        bad = httpx.post(gw.url + "/admin/faults/melt", json={"instance_id": "fake-0"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "fault"
    finally:
        gw.server.stop()


def test_fault_routes_are_off_by_default(gateway):
    resp = httpx.post(gateway.url + "/admin/faults/kill", json={"instance_id": "fake-0"})
    assert resp.status_code == 404 and "error" in resp.json()


def _wait_for(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")
