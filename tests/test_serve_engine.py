"""The server's continuous-batching engine on its own (CPU, tiny llama, the same scheduler as on CUDA):
requests join and leave the running batch, rows keep their own sampling, failures stay alone."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlx_bridge.testing import tiny_hf_model

PROMPTS = ["give three tips", "what is two plus two", "hello", "reverse the list of words please",
           "one two three four five six", "why is the sky"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mlx_bridge import load

    return load(tiny_hf_model(tmp_path_factory.mktemp("eng") / "llama", "llama"))


@contextmanager
def no_eos(model):
    """Random weights: rows run to their max_tokens."""
    saved, model.eos_token_ids = model.eos_token_ids, set()
    try:
        yield model
    finally:
        model.eos_token_ids = saved


@contextmanager
def running(model, **kw):
    from mlx_bridge.serve.engine import Engine

    engine = Engine(model, **kw).start()
    try:
        yield engine
    finally:
        engine.stop()


def until(cond, timeout: float = 60.0) -> None:
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.005)


def job(ids, **s):
    from mlx_bridge.serve.protocol import Sampling

    rows = ids if isinstance(ids[0], list) else [ids]
    return lambda m: (rows, Sampling(**s))


def test_a_request_arriving_mid_batch_starts_before_the_batch_ends(model):
    """Today's static batches made a new request wait for the whole running batch."""
    from mlx_bridge.serve.engine import StreamEnd

    ids = [model.encode_prompt(p) for p in PROMPTS[:2]]
    with no_eos(model):
        alone = model.complete([ids[1]], max_tokens=3)[0]
        long_events: list = []
        with running(model, max_batch=4) as eng:
            long = eng.submit(job(ids[0], max_tokens=200, temperature=0.0), long_events.append)
            until(lambda: eng.metrics.generation_tokens >= 5)  # the long row is decoding
            seen = []
            short = eng.submit(job(ids[1], max_tokens=3, temperature=0.0))
            short.future.add_done_callback(lambda f: seen.append((list(long_events), eng.metrics.generation_tokens)))
            got = short.future.result(timeout=60)[0]
            until(lambda: isinstance(long_events[-1], StreamEnd))
    events_then, tokens_then = seen[0]
    assert not any(isinstance(e, StreamEnd) for e in events_then)  # the long request was still running
    assert tokens_then < 200 and long_events[-1].completion_tokens == 200 and not long.cancelled.is_set()
    assert (got.text, got.token_ids) == (alone.text, alone.token_ids)
    assert eng.metrics.max_running == 2


SETTINGS = [dict(max_tokens=9, temperature=0.0), dict(max_tokens=12, temperature=0.8, seed=1),
            dict(max_tokens=7, temperature=1.3, top_k=5, seed=2), dict(max_tokens=11, temperature=0.9, top_p=0.8, seed=3),
            dict(max_tokens=10, temperature=1.0, seed=4)]


def test_rows_with_different_sampling_in_one_batch_give_what_each_gives_alone(model):
    from mlx_bridge.serve.engine import Piece, StreamEnd

    ids = [model.encode_prompt(p) for p in PROMPTS[:5]]
    twice = [ids[4], ids[4]]  # the last request: one prompt, two rows (n=2) under one seed

    def run(prepares, streamed=()):
        with running(model, max_batch=8) as eng:
            events = {i: [] for i in streamed}
            jobs = [eng.submit(p, events[i].append if i in streamed else None) for i, p in enumerate(prepares)]
            for i, j in enumerate(jobs):
                if i in streamed:
                    until(lambda: any(isinstance(e, StreamEnd) for e in events[i]))
            out = []
            for i, j in enumerate(jobs):
                if i in streamed:
                    out.append(["".join(e.text for e in events[i] if isinstance(e, Piece))])
                else:
                    out.append([(c.text, c.token_ids) for c in j.future.result(timeout=120)])
            return out, eng.metrics.max_running

    with no_eos(model):
        prepares = [job(x, **s) for x, s in zip(ids[:4], SETTINGS[:4])] + [job(twice, **SETTINGS[4])]
        alone = [run([p])[0][0] for p in prepares]
        together, most = run(prepares)  # all waiting when the worker starts: one batch of 6 rows
        assert most == 6
        assert together == alone
        assert alone[4][0] != alone[4][1]  # rows of one request differ under one seed
        assert alone[1][0][1] != model.complete([ids[1]], max_tokens=12)[0].token_ids  # sampled, not greedy
        streamed, _ = run(prepares, streamed=(1, 3))  # streamed pieces concatenate to the same text
        assert streamed[1] == [alone[1][0][0]] and streamed[3] == [alone[3][0][0]]


def test_prefill_in_chunks_while_others_decode(model):
    """A long prompt is written a chunk per round; its tokens are those it gets alone."""
    long = model.encode_prompt(" ".join(PROMPTS * 6))
    short = model.encode_prompt(PROMPTS[0])
    with no_eos(model):
        want = model.complete([long, short], max_tokens=8)
        with running(model, max_batch=2, prefill_chunk=7) as eng:
            a = eng.submit(job(short, max_tokens=8, temperature=0.0))
            b = eng.submit(job(long, max_tokens=8, temperature=0.0))
            got = [b.future.result(timeout=120)[0], a.future.result(timeout=120)[0]]
    assert len(long) > 3 * 7 and [g.token_ids for g in got] == [w.token_ids for w in want]


def test_a_disconnected_client_stops_its_row(model):
    ids = model.encode_prompt(PROMPTS[0])
    with no_eos(model), running(model, max_batch=2) as eng:
        events = []
        j = eng.submit(job(ids, max_tokens=200, temperature=0.0), events.append)
        until(lambda: eng.metrics.generation_tokens >= 3)
        j.cancelled.set()  # what the app does when the client goes away
        until(lambda: eng.metrics.requests["cancelled"] == 1 and eng.metrics.running == 0)
        made = eng.metrics.generation_tokens
        time.sleep(0.2)
        assert eng.metrics.generation_tokens == made < 200  # nothing more is generated for it
        plain = eng.submit(job(ids, max_tokens=200, temperature=0.0))  # not streamed: the same
        until(lambda: eng.metrics.generation_tokens >= made + 3)
        plain.cancelled.set()
        until(lambda: eng.metrics.requests["cancelled"] == 2 and eng.metrics.running == 0)
        assert eng.metrics.generation_tokens < made + 200 and plain.future.cancelled()


def test_a_full_queue_answers_429_with_retry_after(model):
    from mlx_bridge.serve.engine import Engine
    from mlx_bridge.serve.protocol import APIError

    eng = Engine(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    ids = model.encode_prompt(PROMPTS[0])
    eng.submit(job(ids, max_tokens=2, temperature=0.0))
    eng.submit(job(ids, max_tokens=2, temperature=0.0))
    with pytest.raises(APIError) as e:
        eng.submit(job(ids, max_tokens=2, temperature=0.0))
    assert e.value.status == 429 and e.value.retry_after >= 1 and eng.metrics.requests["rejected"] == 1


# -- regression tests for the bugs of the static-batch worker ---------------------------------------------

def test_a_failing_request_fails_alone_with_one_end_per_row_and_no_internals(model, monkeypatch):
    """The old worker retried a failed batch request by request: a streamed request whose rows had
    ended was run again (two StreamEnds, usage counted twice) and a 500 carried the exception text."""
    from mlx_bridge.serve.engine import StreamEnd
    from mlx_bridge.serve.protocol import APIError

    ids = [model.encode_prompt(p) for p in PROMPTS[:2]]
    bad_first = model.complete([ids[1]], max_tokens=1)[0].token_ids[0]
    assert model.complete([ids[0]], max_tokens=6)[0].token_ids[0] != bad_first
    decode = model.decode

    def broken_decode(toks):  # the tokenizer fails on the second request's text only
        if toks and toks[0] == bad_first:
            raise RuntimeError("secret internal detail")
        return decode(toks)

    monkeypatch.setattr(model, "decode", broken_decode)
    events = []
    with no_eos(model), running(model, max_batch=4) as eng:
        ok = eng.submit(job([ids[0], ids[0]], max_tokens=6, temperature=0.0), events.append)
        bad = eng.submit(job(ids[1], max_tokens=6, temperature=0.0))
        err = bad.future.exception(timeout=60)
        until(lambda: sum(isinstance(e, StreamEnd) for e in events) == 2)
        time.sleep(0.2)
        assert eng.alive
    ends = [e for e in events if isinstance(e, StreamEnd)]
    assert sorted(e.index for e in ends) == [0, 1] and all(e.completion_tokens == 6 for e in ends)
    assert not any(isinstance(e, APIError) for e in events)
    assert isinstance(err, APIError) and err.status == 500 and "secret" not in err.message
    assert eng.metrics.requests["failed"] == 1 and not ok.cancelled.is_set()


def test_a_client_callback_that_raises_does_not_kill_the_worker(model):
    """The old `_fail` called `emit` inside its `except`: a raising emit killed the worker thread."""
    ids = model.encode_prompt(PROMPTS[0])

    def emit(ev):
        raise ConnectionError("client gone")

    with running(model, max_batch=2) as eng:
        eng.submit(job(ids, max_tokens=4, temperature=0.0), emit)
        after = eng.submit(job(ids, max_tokens=4, temperature=0.0))
        assert after.future.result(timeout=60)[0].token_ids == model.complete([ids], max_tokens=4)[0].token_ids
        assert eng.alive


def test_the_engine_reports_a_model_that_can_no_longer_run(model, monkeypatch):
    from mlx_bridge.serve.protocol import APIError

    ids = model.encode_prompt(PROMPTS[0])
    with running(model, max_batch=2) as eng:
        def launch(*a, **k):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(eng.runner, "launch", launch)
        err = eng.submit(job(ids, max_tokens=4, temperature=0.0)).future.exception(timeout=60)
        assert isinstance(err, APIError) and err.status == 500 and "CUDA" not in err.message
        until(lambda: not eng.alive)
        with pytest.raises(APIError) as e:
            eng.submit(job(ids, max_tokens=4, temperature=0.0))
        assert e.value.status == 503


def test_a_paused_stream_blocks_nobody(model):
    """`stream_ids` held the model lock across `yield`: a partly read stream blocked every other
    call, and a call from the same thread deadlocked."""
    ids = model.encode_prompt(PROMPTS[1])
    want = model.complete([ids], max_tokens=20)[0].text
    other = model.generate(PROMPTS[0], max_tokens=5)
    stream = model.stream_ids(ids, max_tokens=20)
    first = next(stream)
    got = {}

    def call():  # from another thread, then from this stream's own thread, with the stream paused
        got["other"] = model.generate(PROMPTS[0], max_tokens=5)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(60)
    assert got.get("other") == other
    done = threading.Event()

    def same_thread():
        s = model.stream_ids(ids, max_tokens=20)
        head = next(s)
        got["inner"] = model.generate(PROMPTS[0], max_tokens=5)
        got["same"] = head + "".join(s)
        done.set()

    threading.Thread(target=same_thread, daemon=True).start()
    assert done.wait(60), "a call from the stream's own thread deadlocked"
    assert got["inner"] == other and got["same"] == want
    assert first + "".join(stream) == want


def test_row_text_decodes_incrementally(model):
    """`RowText` decoded the whole row at every chunk: quadratic in the row's length."""
    from mlx_bridge.deploy.generation import RowText

    ids = (model.complete([model.encode_prompt(PROMPTS[3])], max_tokens=40, ignore_eos=True)[0].token_ids * 10)[:400]
    seen = [0]

    def decode(toks):
        seen[0] += len(toks)
        return model.decode(toks)

    row = RowText(decode, set(), None, len(ids) + 1)
    pieces = "".join(row.add([t]) for t in ids) + row.close()
    assert pieces == model.decode(ids)
    assert seen[0] < 10 * len(ids)  # the old RowText decoded 400 * 401 / 2 = 80,200 ids here


def test_runners_share_one_protocol_and_the_pipeline_imports_no_loader(model, tmp_path):
    import subprocess
    import sys

    from mlx_bridge import load
    from mlx_bridge.deploy.runners.base import Runner
    from mlx_bridge.deploy.runners.fast import FastRunner

    assert isinstance(model.runner, Runner) and isinstance(FastRunner(load(model_dir(model)).module), Runner)
    code = ("import sys, mlx_bridge.deploy.runners.pipeline as p; "
            "print('mlx_bridge.deploy.loader' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # loader -> pipeline only: no import cycle


def model_dir(model) -> Path:
    return Path(model.tokenizer.name_or_path)


@pytest.mark.parametrize("arch, backend, runner", [("mixtral", "native", "SlotRunner"),
                                                    ("llama", "transformers", "RowRunner"),
                                                    ("deepseek_v3", "native", "RowRunner")])
def test_moe_and_transformers_models_run_the_same_scheduler(tmp_path, arch, backend, runner):
    """Native MoE layers share the slot pool (routed experts on the fused path); transformers models and
    deepseek_v3's latent attention get one cache per row (`RowRunner`); all give the answers they give alone."""
    from mlx_bridge import load

    m = load(tiny_hf_model(tmp_path / arch, arch), backend=backend)
    ids = [m.encode_prompt(p) for p in PROMPTS[:3]]
    want = [m.complete([x], max_tokens=6)[0].token_ids for x in ids]
    with running(m, max_batch=2) as eng:
        assert type(eng.runner).__name__ == runner
        jobs = [eng.submit(job(x, max_tokens=6, temperature=0.0)) for x in ids]
        got = [j.future.result(timeout=120)[0].token_ids for j in jobs]
        seeded = [eng.submit(job(ids[0], max_tokens=6, temperature=1.0, seed=5)) for _ in range(2)]
        a, b = (j.future.result(timeout=120)[0].token_ids for j in seeded)
    assert got == want and a == b
