"""The server under hostile or heavy traffic (CPU, tiny llama, real uvicorn on loopback): bounded
work, queue and connections, timeouts, disconnects, 400 not 500 for odd JSON, health, metrics."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from mlx_bridge.testing import tiny_hf_model

PROMPT = "give three tips"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_hf_model(tmp_path_factory.mktemp("lim") / "llama", "llama")


@pytest.fixture(scope="module")
def server(export_dir):
    """(url, app, model): 2 KV slots, 1 request may wait, 2,000 tokens a request, 1 s for a body,
    0.5 s for a request head; each decode step slowed to 20 ms so that requests overlap."""
    from mlx_bridge import load
    from mlx_bridge.serve.app import create_app
    from mlx_bridge.serve.http import Limits, ServerThread

    model = load(export_dir)
    model.eos_token_ids = set()  # rows run to max_tokens
    app = create_app(model, model_name="m", max_batch=2, max_queue=1, max_request_tokens=2000, body_timeout=1.0,
                     max_tokens_limit=240)
    launch = app.state.engine.runner.launch

    def slow(*a, **k):
        time.sleep(0.02)
        return launch(*a, **k)

    app.state.engine.runner.launch = slow
    with ServerThread(app, limits=Limits(header_timeout=0.5, idle_timeout=1)) as srv:
        yield srv.url, app, model


def post(url, body, **kw):
    return httpx.post(url + "/v1/completions", json=body, timeout=kw.pop("timeout", 120), **kw)


def until(cond, timeout=60.0):
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("body, param, words", [
    ('{"prompt": "hi", "seed": %d}' % 2 ** 70, "seed", "seed"),
    ('{"prompt": "hi", "stream_options": {"include_usage": true}}', "stream_options", "only allowed when stream"),
    ('{"prompt": "hi", "stream": true, "stream_options": {"include_usage": 1}}', "stream_options", "include_usage"),
    ('{"prompt": "hi", "stream": true, "stream_options": {"usage": true}}', "stream_options", "'usage'"),
    ('{"prompt": "hi", "stream": true, "stream_options": []}', "stream_options", "stream_options"),
    ('{"prompt": ["dog", "dog", "dog", "dog", "dog", "dog", "dog", "dog", "dog"], "n": 16}', "n", "--max-request-tokens"),
])
def test_bad_fields_answer_400_naming_them(server, body, param, words):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", content=body.encode(), timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]


def test_json_nested_200k_deep_is_a_400(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/completions", content=b"[" * 200_000 + b"]" * 200_000, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                   timeout=60)
    assert r.status_code in (400, 413)


def test_a_500_says_nothing_about_the_internals(server, monkeypatch):
    url, _, model = server

    def boom(*a, **k):
        raise RuntimeError("secret /home/user/path detail")

    monkeypatch.setattr(model, "encode_prompt", boom)
    r = post(url, {"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 500 and "secret" not in r.text and "RuntimeError" not in r.text


def test_a_full_queue_answers_429_with_retry_after(server):
    url, app, _ = server
    engine = app.state.engine
    results = []

    def long():
        results.append(post(url, {"prompt": PROMPT, "max_tokens": 200}).status_code)

    threads = [threading.Thread(target=long) for _ in range(3)]  # 2 slots, then 1 waiting
    for t, busy in zip(threads, [(1, 0), (2, 0), (2, 1)]):
        t.start()
        until(lambda: (engine.metrics.running, engine.metrics.waiting) == busy)
    r = post(url, {"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    for t in threads:
        t.join(120)
    assert results == [200, 200, 200]


def test_a_client_that_gives_up_stops_its_row(server):
    """A plain (not streamed) request whose client times out: the worker stops generating for it."""
    url, app, _ = server
    m = app.state.engine.metrics
    cancelled, made = m.requests["cancelled"], m.generation_tokens
    with pytest.raises(httpx.ReadTimeout):
        post(url, {"prompt": PROMPT, "max_tokens": 240}, timeout=0.5)
    until(lambda: m.requests["cancelled"] == cancelled + 1 and m.running == 0, timeout=10)
    assert m.generation_tokens - made < 100  # 240 steps would take 4.8 s; it stopped within about a second


def test_slow_heads_and_bodies_are_cut_off(server):
    url, _, _ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # connects, never sends a request head
        s.settimeout(30)  # far past the fixture's header timeout: a server without one never closes
        assert s.recv(1) == b""  # closed by the server
    with socket.create_connection((host, int(port))) as s:  # a head, then a body that never comes
        s.settimeout(30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\":")
        answer = b""
        while b"request_timeout" not in answer:  # the head and the body may come in separate segments
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.decode().startswith("HTTP/1.1 408") and b"request_timeout" in answer


def test_defaults_come_from_generation_config(export_dir, tmp_path):
    """`do_sample: false` (what the export says) makes a request without temperature greedy, as
    transformers' generate and the CLI are; the server used OpenAI's temperature 1.0."""
    from mlx_bridge.errors import BridgeError
    from mlx_bridge.serve.app import generation_defaults

    cfg = json.loads((export_dir / "generation_config.json").read_text())
    assert not cfg.get("do_sample") and generation_defaults(export_dir) == {"temperature": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "top_k": "x"}')
    with pytest.raises(BridgeError, match="generation_config.json: top_k must be a number"):
        generation_defaults(tmp_path)
    assert generation_defaults(tmp_path / "none") == {}


def test_serve_defaults_to_the_device_generate_uses():
    import argparse

    from mlx_bridge.deploy import cli_generate
    from mlx_bridge.serve import cli

    p, g = argparse.ArgumentParser(), argparse.ArgumentParser()
    cli.build_parser(p)
    cli_generate.build_parser(g)
    assert p.parse_args(["d"]).device == g.parse_args(["d", "--prompt", "x"]).device == "auto"


def test_metrics_in_prometheus_format(server):
    url, _, _ = server
    assert post(url, {"prompt": PROMPT, "max_tokens": 3}).status_code == 200
    text = httpx.get(url + "/metrics").text
    for name in ("num_requests_waiting", "num_requests_running", "generation_tokens_total",
                 "generation_tokens_per_second", "time_to_first_token_seconds_bucket",
                 "e2e_request_latency_seconds_count", 'requests_total{outcome="finished"}', "healthy 1"):
        assert "mlx_bridge:" + name in text, name
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    assert all(len(x.split(" ")) == 2 for x in lines)  # name{labels} value
    count = next(x for x in lines if x.startswith("mlx_bridge:time_to_first_token_seconds_count"))
    assert int(count.split()[1]) >= 1


def test_health_fails_once_the_model_cannot_run(export_dir):
    from mlx_bridge import load
    from mlx_bridge.serve.app import create_app
    from mlx_bridge.serve.http import ServerThread

    app = create_app(load(export_dir), model_name="m", max_batch=2)
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200

        def launch(*a, **k):
            raise RuntimeError("device lost")

        app.state.engine.runner.launch = launch
        r = post(srv.url, {"prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 500 and "device lost" not in r.text
        until(lambda: httpx.get(srv.url + "/health").status_code == 503)
        assert post(srv.url, {"prompt": PROMPT, "max_tokens": 4}).status_code == 503
        assert "mlx_bridge:healthy 0" in httpx.get(srv.url + "/metrics").text


def test_requests_fit_the_kv_slot_length(export_dir):
    """`max_len` (--max-model-len) below the model's context: a chat request without max_tokens gets
    what the slot leaves, a longer one a 400 naming the length."""
    from mlx_bridge import load
    from mlx_bridge.serve.app import create_app
    from mlx_bridge.serve.http import ServerThread

    model = load(export_dir)
    model.eos_token_ids = set()
    with ServerThread(create_app(model, model_name="m", max_batch=1, max_len=40, max_tokens_limit=200)) as srv:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["max_model_len"] == 40
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                       timeout=120)
        u = r.json()["usage"]
        assert r.status_code == 200 and u["prompt_tokens"] + u["completion_tokens"] == 40
        r = post(srv.url, {"prompt": PROMPT, "max_tokens": 100})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded" and "40" in r.text
