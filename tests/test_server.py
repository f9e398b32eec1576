"""Issue 4, the OpenAI-compatible server, driven by the official `openai` client against a real uvicorn
server on a free loopback port, serving a tiny exported llama through `mlx_bridge.load`.

Expected texts are computed with the `DeployedModel` API before the server starts (so the model is
never used from two threads), and every server answer is compared with them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from mlx_bridge.testing import tiny_hf_model

KEY = "sk-test-key"
NAME = "tiny-llama"
PROMPTS = ["give three tips", "what is two plus two", "hello", "reverse the list of words please",
           "one two three four five six", "why is the sky", "write code", "the model"]
CHAT = [{"role": "system", "content": "you answer"}, {"role": "user", "content": "how to eat and sleep"}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tiny_hf_model(tmp_path_factory.mktemp("srv") / "llama", "llama")  # an unadapted dense export's layout


@pytest.fixture(scope="module")
def served(export_dir):
    """(client, url, expected): expected answers from DeployedModel, then the server on top of it."""
    from mlx_bridge import load
    from mlx_bridge.serve.app import ServerThread, create_app

    model = load(export_dir)
    greedy = dict(max_tokens=MAX_TOKENS, temperature=0.0)
    expected = {
        "generate": {p: model.generate(p, chat=False, **greedy) for p in PROMPTS},
        "complete": {p: model.complete([model.encode_prompt(p)], **greedy)[0] for p in PROMPTS},
        "chat": model.complete([model.encode_prompt(messages=CHAT)], **greedy)[0],
        "stop": None,
    }
    text = expected["complete"][PROMPTS[0]].text
    stop = text.split()[2]  # a word the greedy answer contains
    expected["stop"] = (stop, model.complete([model.encode_prompt(PROMPTS[0])], stop=[stop], **greedy)[0])
    app = create_app(model, model_name=NAME, api_key=KEY, max_tokens_limit=64, max_body_bytes=32 * 1024, max_batch=4)
    with ServerThread(app) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0), srv.url, expected


def test_models_list(served):
    client, url, _ = served
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.get(url + "/health").json()["status"] == "ok"  # no key needed for health checks


def test_completion_equals_generate(served):
    client, _, exp = served
    for p in PROMPTS[:3]:
        r = client.completions.create(model=NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
        want = exp["complete"][p]
        assert r.choices[0].text == exp["generate"][p] == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
        assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")


def test_completion_batch_prompts_and_n(served):
    client, _, exp = served
    r = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [exp["generate"][PROMPTS[0]]] * 2 + [exp["generate"][PROMPTS[1]]] * 2
    want = [exp["complete"][p] for p in PROMPTS[:2]]
    assert r.usage.prompt_tokens == sum(w.prompt_tokens for w in want)  # prompts counted once, not per sample
    assert r.usage.completion_tokens == 2 * sum(len(w.token_ids) for w in want)


def test_chat(served):
    client, _, exp = served
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_completion_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == exp["chat"].text
    assert r.choices[0].finish_reason == exp["chat"].finish_reason
    assert r.usage.prompt_tokens == exp["chat"].prompt_tokens and r.object == "chat.completion"


def test_streaming_chat(served):
    client, _, exp = served
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == exp["chat"].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [exp["chat"].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp["chat"].token_ids)
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_streaming_completion_raw_sse(served):
    """The wire format itself: `data: {...}` events, OpenAI chunk shape, `data: [DONE]` last."""
    _, url, exp = served
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == exp["generate"][PROMPTS[1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == exp["complete"][PROMPTS[1]].finish_reason


def test_stop_string(served):
    client, _, exp = served
    stop, want = exp["stop"]
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].text == want.text and stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(served):
    client, _, _ = served
    kw = dict(model=NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=1.0, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_bad_api_key(served):
    _, url, _ = served
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=NAME, messages=CHAT, max_tokens=2)
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi"})  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_oversized_request(served):
    client, url, _ = served
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=NAME, prompt="give " * 20_000, max_tokens=2)
    assert e.value.status_code == 413
    # chunked upload without Content-Length is cut off too
    r = httpx.post(url + "/v1/completions", content=iter([b'{"prompt": "', b"x" * 40_000, b'"}']),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("body, status, words", [
    (b'{"prompt": "hi", "max_tokens": ', 400, "parse the JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"prompt": "hi", "max_tokens": 65}', 400, "at most 64"),
    (b'{"prompt": "hi", "temperature": 3}', 400, "temperature"),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": [[1, 2], [100000]]}', 400, "token ids"),
    (b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"prompt": "hi", "logprobs": 2}', 400, "logprobs"),
    (b'{"prompt": "hi", "model": "gpt-4"}', 404, "gpt-4"),
])
def test_bad_requests_answer_openai_errors(served, body, status, words):
    client, url, exp = served
    r = httpx.post(url + "/v1/completions", content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error"
    # and the server keeps serving
    ok = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert ok.choices[0].text == exp["generate"][PROMPTS[0]]


def test_prompt_longer_than_context(served):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi " * 300}], max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "256" in e.value.message
    with pytest.raises(openai.BadRequestError):  # also when streaming: refused before the stream starts
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi " * 300}], stream=True)


def test_concurrent_requests_equal_sequential(served):
    """Many clients at once, streamed and not: every answer is the one it gets alone."""
    client, _, exp = served

    def ask(i):
        p = PROMPTS[i % len(PROMPTS)]
        if i % 4 == 3:
            s = client.completions.create(model=NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0, stream=True)
            return p, "".join(c.choices[0].text for c in s)
        return p, client.completions.create(model=NAME, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(24)))
    assert [a for _, a in answers] == [exp["generate"][p] for p, _ in answers]


# -- the worker on its own: batching and failure isolation, deterministic ---------------------------

def test_engine_batches_waiting_jobs_and_isolates_failures(export_dir):
    from mlx_bridge import load
    from mlx_bridge.serve.engine import Engine
    from mlx_bridge.serve.protocol import APIError, Sampling

    model = load(export_dir)
    s = Sampling(max_tokens=MAX_TOKENS, temperature=0.0)
    ids = [model.encode_prompt(p) for p in PROMPTS[:5]]
    alone = [model.complete([x], max_tokens=MAX_TOKENS)[0] for x in ids]

    def rows(x):
        return lambda m: ([x], s)

    def refused(m):
        raise APIError(400, "refused in prepare")

    def run(prepares):
        engine = Engine(model, max_batch=4)
        jobs = [engine.submit(p) for p in prepares]
        engine.start()  # every job is already waiting: the worker takes them together
        try:
            return [j.future.exception(timeout=120) or j.future.result() for j in jobs], engine.stats
        finally:
            engine.stop()

    got, stats = run([rows(x) for x in ids])
    assert [g[0].text for g in got] == [a.text for a in alone]
    assert [g[0].token_ids for g in got] == [a.token_ids for a in alone]
    assert (stats.batches, stats.max_rows) == (2, 4)  # 5 rows in batches of at most max_batch

    bad_ids = [model.config["vocab_size"] + 5]  # passes prepare, the model itself rejects it
    got, stats = run([rows(ids[0]), rows(bad_ids), refused, rows(ids[1])])
    assert [g[0].text for g in (got[0], got[3])] == [alone[0].text, alone[1].text]  # batch-mates unharmed
    assert isinstance(got[1], APIError) and got[1].status == 400 and "vocabulary" in got[1].message
    assert isinstance(got[2], APIError) and got[2].message == "refused in prepare"
    assert stats.errors == 2

    # a streamed job whose client goes away stops generating at the next piece
    pieces = []
    engine = Engine(model, max_batch=4)
    long = Sampling(max_tokens=40, temperature=1.0, seed=0)

    def emit(ev):
        pieces.append(ev)
        if len(pieces) == 3:
            job.cancelled.set()

    job = engine.submit(lambda m: ([ids[0]], long), emit)
    engine.start()
    engine.stop()
    assert pieces[0] == "start" and len(pieces) == 3 and engine.stats.cancelled == 1


def test_engine_batches_streams_with_other_requests(export_dir):
    """Streamed and plain greedy jobs with different max_tokens and stop strings share one batch; each
    row gets what it would get alone, streamed pieces included."""
    from mlx_bridge import load
    from mlx_bridge.serve.engine import Engine, Piece, StreamEnd
    from mlx_bridge.serve.protocol import Sampling

    model = load(export_dir)
    ids = [model.encode_prompt(p) for p in PROMPTS[:4]]
    full = model.complete([ids[1]], max_tokens=12, ignore_eos=True)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a stop string the second row meets halfway
    settings = [Sampling(max_tokens=5, temperature=0.0), Sampling(max_tokens=12, temperature=0.0, stop=(stop,)),
                Sampling(max_tokens=9, temperature=0.0), Sampling(max_tokens=7, temperature=0.0, seed=3)]
    alone = [model.complete([x], **s.kwargs())[0] for x, s in zip(ids, settings)]
    streamed = {1: [], 2: []}

    def emitter(i):
        return streamed[i].append

    engine = Engine(model, max_batch=8)
    jobs = [engine.submit(lambda m, x=x, s=s: ([x], s), emitter(i) if i in streamed else None)
            for i, (x, s) in enumerate(zip(ids, settings))]
    engine.start()
    for j in jobs:
        if j.emit is None:
            j.future.result(timeout=120)
    engine.stop()
    assert (engine.stats.batches, engine.stats.max_rows, engine.stats.streams) == (1, 4, 2)
    for i in (0, 3):
        c = jobs[i].future.result()[0]
        assert (c.text, c.token_ids, c.finish_reason) == (alone[i].text, alone[i].token_ids, alone[i].finish_reason)
    for i, events in streamed.items():
        assert events[0] == "start" and isinstance(events[-1], StreamEnd)
        text = "".join(e.text for e in events if isinstance(e, Piece))
        end = events[-1]
        assert (text, end.finish_reason, end.completion_tokens) == (alone[i].text, alone[i].finish_reason,
                                                                    len(alone[i].token_ids))
    assert alone[1].finish_reason == "stop"


def test_engine_answers_a_short_request_before_its_long_batch_mate_ends(export_dir):
    from mlx_bridge import load
    from mlx_bridge.serve.engine import Engine, Piece, StreamEnd
    from mlx_bridge.serve.protocol import Sampling

    model = load(export_dir)
    model.eos_token_ids = set()  # random weights: both rows run to their max_tokens
    ids = [model.encode_prompt(p) for p in PROMPTS[:2]]
    events = []
    engine = Engine(model, max_batch=8)
    short = engine.submit(lambda m: ([ids[0]], Sampling(max_tokens=2, temperature=0.0)))
    long = engine.submit(lambda m: ([ids[1]], Sampling(max_tokens=120, temperature=0.0)), events.append)
    seen_when_short_done = []
    short.future.add_done_callback(lambda f: seen_when_short_done.append(len(events)))
    engine.start()
    assert len(short.future.result(timeout=120)[0].token_ids) == 2
    engine.stop()
    assert engine.stats.batches == 1 and isinstance(events[-1], StreamEnd) and events[-1].completion_tokens == 120
    pieces = sum(isinstance(e, Piece) for e in events)
    assert seen_when_short_done[0] < pieces // 2  # answered early in the long row's generation


# -- the command line ----------------------------------------------------------------------------------

def test_cli_refuses_bad_input(tmp_path, export_dir, capsys):
    from mlx_bridge.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "70000", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--port 70000" in err and "--max-batch 0" in err and "missing: not a directory" in err
    with socket.socket() as taken:  # a taken port is refused before the model is loaded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(export_dir), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen there" in capsys.readouterr().err


def test_cli_serves(export_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_bridge", "serve", str(export_dir), "--port", str(port),
                             "--api-key", KEY, "--model-name", NAME, "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            assert proc.poll() is None, proc.stdout.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME]
    finally:
        proc.terminate()
        proc.wait(30)


def test_warm_up_prepares_the_fast_path_buckets(export_dir):
    from mlx_bridge import load
    from mlx_bridge.deploy.runners.fast import warm_up

    assert warm_up(load(export_dir), max_batch=8) is None  # the eager runner has nothing to prepare
    m = load(export_dir, fast=True)
    assert m.max_context == 256  # the tiny model's context: its requests start in the 256 bucket
    assert warm_up(m, max_batch=6) == "batch sizes [1, 8] x 256 positions, greedy and sampled"
    assert sorted(m.runner._states) == [(1, 256), (8, 256)]
    before = m.runner.stats["buckets"]
    m.complete([m.encode_prompt(p) for p in PROMPTS[:5]], max_tokens=200)  # 5 rows: bucket 8, prepared
    assert m.runner.stats["buckets"] == before
