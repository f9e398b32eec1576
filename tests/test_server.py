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
    """A seed repeats its text; other seeds give other texts (so the seed is used, and the
    temperature: a server that ignores it answers every seed greedily)."""
    client, _, exp = served
    kw = dict(model=NAME, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=1.5)
    assert client.completions.create(**kw, seed=7).choices[0].text == client.completions.create(**kw, seed=7).choices[0].text
    texts = {client.completions.create(**kw, seed=s).choices[0].text for s in range(6)}
    assert len(texts) >= 3 and texts != {exp["generate"][PROMPTS[2]]}
    greedy = client.completions.create(**{**kw, "temperature": 0}, seed=7).choices[0].text
    assert greedy == exp["generate"][PROMPTS[2]]  # temperature 0 is greedy whatever the seed


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

    _, url, _ = served
    before = httpx.get(url + "/health").json()["stats"]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, range(24)))
    assert [a for _, a in answers] == [exp["generate"][p] for p, _ in answers]
    after = httpx.get(url + "/health").json()["stats"]
    steps, tokens = after["steps"] - before["steps"], after["generation_tokens"] - before["generation_tokens"]
    assert after["max_running"] > 1 and steps < tokens / 1.5  # rows shared decode steps: it batched


# -- the command line ----------------------------------------------------------------------------------

def test_cli_refuses_bad_input(tmp_path, export_dir, capsys):
    from mlx_bridge.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "70000", "--max-batch", "0", "--mixed-lanes", "-1",
                 "--mixed-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "--port 70000" in err and "--max-batch 0" in err and "missing: not a directory" in err
    assert "--mixed-lanes -1" in err and "--mixed-tokens 0" in err
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
