"""Mixed steps in the server (CPU, tiny models in float32): newcomers' prompt chunks ride on the running
rows' decode steps (one forward pass for both), the running rows get a token every step while a long
prompt prefills, and every row's tokens are those of the separate-prefill path."""

from __future__ import annotations

import time

import pytest

from mlx_bridge.testing import tiny_hf_model

PROMPTS = ["give three tips", "what is two plus two", "hello", "reverse the list of words please"]


@pytest.fixture(scope="module", params=["llama", "gemma2"])  # gemma2: softcaps and a sliding window
def model(request, tmp_path_factory):
    from mlx_bridge import load

    m = load(tiny_hf_model(tmp_path_factory.mktemp("mix") / request.param, request.param))
    m.eos_token_ids = set()  # random weights: rows run to their max_tokens
    return m


def until(cond, timeout: float = 60.0) -> None:
    t = time.monotonic()
    while not cond():
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.001)


def spy(runner) -> list:
    """Log each `prefill` call and each `launch` as ("launch", slots, chunks)."""
    log: list = []
    prefill, launch = runner.prefill, runner.launch
    runner.prefill = lambda chunks: log.append(("prefill", [c.slot for c in chunks], chunks)) or prefill(chunks)
    runner.launch = lambda slots, *a, chunks=(): log.append(("launch", list(slots), list(chunks))) or launch(
        slots, *a, chunks=chunks)
    return log


def test_a_long_prompt_rides_on_the_decode_steps_of_running_rows(model):
    """A 2-token row ends, so the long prompt takes slot 0 below a row still decoding in slot 1 (the
    step computes slot 0 and must not write into the prompt there). Its chunks (2 lanes x 8 tokens a
    step) all ride on decode steps: no separate prefill call, the running row is in every one of
    those steps (a token each), and both rows' tokens are those each gets alone."""
    from mlx_bridge.serve.engine import Engine
    from mlx_bridge.serve.protocol import Sampling

    first, short, long = (model.encode_prompt(p) for p in (PROMPTS[1], PROMPTS[2], " ".join(PROMPTS * 3)))
    want = [model.complete([x], max_tokens=n)[0].token_ids for x, n in ((short, 40), (long, 12))]
    eng = Engine(model, max_batch=2, mix=(2, 8))
    log = spy(eng.runner)
    greedy = lambda x, n: lambda m: ([x], Sampling(max_tokens=n, temperature=0.0))  # noqa: E731
    eng.start()
    try:
        a = eng.submit(greedy(first, 2))
        b = eng.submit(greedy(short, 40))
        a.future.result(timeout=60)
        until(lambda: eng.metrics.generation_tokens >= 6)  # the short row decodes alone, in slot 1
        n = len(log)
        c = eng.submit(greedy(long, 12))
        got = [b.future.result(timeout=120)[0].token_ids, c.future.result(timeout=120)[0].token_ids]
    finally:
        eng.stop()
    assert got == want
    after = log[n:]
    riding = [e for e in after if e[0] == "launch" and e[2]]
    assert not [e for e in after if e[0] == "prefill"], "the long prompt took a separate prefill call"
    assert len(long) > 2 * 16 and len(riding) == -(-len(long) // 16)
    assert all(e[1] == [1] and {ch.slot for ch in e[2]} == {0} for e in riding)  # slot 1 decodes in every one
    assert [t for e in riding for ch in e[2] for t in ch.tokens] == long
    assert [ch.start for e in riding for ch in e[2]] == list(range(0, len(long), 8))


def test_with_no_row_decoding_prompts_ride_steps_of_their_own(model):
    """A prompt arriving while nothing runs is written by mixed steps without decode rows (2 lanes x 8
    tokens each, no separate prefill call: the prefill path's uncompiled layers are slower on CUDA), and
    the rows' tokens are those each gets alone; a second prompt arriving then rides on the first's steps."""
    from mlx_bridge.serve.engine import Engine
    from mlx_bridge.serve.protocol import Sampling

    long, short = model.encode_prompt(" ".join(PROMPTS * 2)), model.encode_prompt(PROMPTS[2])
    want = [model.complete([x], max_tokens=n)[0].token_ids for x, n in ((long, 30), (short, 6))]
    eng = Engine(model, max_batch=2, mix=(2, 8))
    log = spy(eng.runner)
    eng.start()
    try:
        a = eng.submit(lambda m: ([long], Sampling(max_tokens=30, temperature=0.0)))
        until(lambda: eng.metrics.generation_tokens >= 3)
        b = eng.submit(lambda m: ([short], Sampling(max_tokens=6, temperature=0.0)))
        got = [a.future.result(timeout=120)[0].token_ids, b.future.result(timeout=120)[0].token_ids]
    finally:
        eng.stop()
    assert got == want
    assert not [e for e in log if e[0] == "prefill"]
    alone = -(-len(long) // 16)  # steps of 2 lanes x 8 tokens before the long prompt's row decodes
    assert len(long) > 16 and all(e[0] == "launch" and e[1] == [] and e[2] for e in log[:alone])
    assert [len(e[2]) for e in log[:alone - 1]] == [2] * (alone - 1)
    assert [t for e in log[:alone] for ch in e[2] for t in ch.tokens] == long
    assert log[alone][1] == [0]  # then the row decodes
    assert any(e[1] == [0] and e[2] for e in log[alone:])  # the short prompt rode on the long one's steps


def test_mixed_steps_give_the_separate_prefill_paths_tokens(model):
    """Rows arriving while others decode, greedy and seeded-sampled, several newcomers in one step:
    the same tokens with mixed steps as with separate prefill calls (and greedy as `complete`)."""
    from mlx_bridge.serve.engine import Engine
    from mlx_bridge.serve.protocol import Sampling

    ids = [model.encode_prompt(p) for p in PROMPTS] + [model.encode_prompt(" ".join(PROMPTS * 2))]
    kinds = [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=3), dict(temperature=0.0),
             dict(temperature=1.0, top_k=5, seed=11), dict(temperature=0.0)]

    def run(mix):
        eng = Engine(model, max_batch=4, mix=mix)
        log = spy(eng.runner)
        eng.start()
        try:
            jobs = [eng.submit(lambda m, x=ids[0], k=kinds[0]: ([x], Sampling(max_tokens=24, **k)))]
            until(lambda: eng.metrics.generation_tokens >= 3)  # then four newcomers at once
            jobs += [eng.submit(lambda m, x=x, k=k: ([x], Sampling(max_tokens=10, **k)))
                     for x, k in zip(ids[1:], kinds[1:])]
            return [j.future.result(timeout=120)[0].token_ids for j in jobs], log
        finally:
            eng.stop()

    mixed, log = run((4, 16))
    separate, plain = run(None)
    assert mixed == separate
    assert [mixed[i] for i in (0, 2, 4)] == [model.complete([ids[i]], max_tokens=n)[0].token_ids
                                             for i, n in ((0, 24), (2, 10), (4, 10))]
    assert max(len(e[2]) for e in log if e[0] == "launch") > 1  # newcomers together in one mixed step
    assert not [e for e in plain if e[0] == "launch" and e[2]]  # mix=None: no chunk rode on a step


@pytest.mark.parametrize("newcomers,lanes", [(13, [13]), (9, [4, 4, 1])])
def test_a_burst_of_newcomers_rides_in_wide_steps(model, newcomers, lanes):
    """Newcomers arriving together while a row decodes ride in as few mixed steps as the prepared lane
    counts (1, 4, 16) carry well (`shapes.carried`): 13 in one 16-lane step, 9 in two 4-lane steps
    and one 1-lane step; the decoding row is in each; every row's tokens are those it gets alone."""
    import threading

    from mlx_bridge.serve.engine import Engine
    from mlx_bridge.serve.protocol import Sampling

    words = ["hello", "two", "tips", "list", "words", "give", "three", "what", "is", "plus", "reverse", "of", "the"]
    ids = [model.encode_prompt(w) for w in words[:newcomers]]
    eng = Engine(model, max_batch=16, mix=(16, 8))
    assert eng.runner.mix_lanes == (1, 4, 16)
    log = spy(eng.runner)
    inside, go = threading.Event(), threading.Event()

    def held(m, x=ids[0]):  # the worker waits here, in the middle of taking new requests
        inside.set()
        go.wait(60)
        return [x], Sampling(max_tokens=6, temperature=0.0)

    eng.start()
    try:
        first = eng.submit(lambda m: ([model.encode_prompt(PROMPTS[1])], Sampling(max_tokens=60, temperature=0.0)))
        until(lambda: eng.metrics.generation_tokens >= 3)
        jobs = [eng.submit(held)]
        assert inside.wait(60)
        n = len(log)
        jobs += [eng.submit(lambda m, x=x: ([x], Sampling(max_tokens=6, temperature=0.0))) for x in ids[1:]]
        go.set()
        got = [j.future.result(timeout=120)[0].token_ids for j in jobs]
        first.future.result(timeout=120)
    finally:
        eng.stop()
    riding = [e for e in log[n:] if e[0] == "launch" and e[2]]
    assert [len(e[2]) for e in riding] == lanes
    assert all(0 in e[1] for e in riding)  # the first request's row (slot 0) decodes in each
    assert not [e for e in log[n:] if e[0] == "prefill"]
    assert got == [model.complete([x], max_tokens=6)[0].token_ids for x in ids]


def test_mixed_step_pads_lanes_as_on_cuda_and_refuses_what_does_not_fit(model):
    """One chunk runs one lane, two run the step's 4 lanes (padding lanes write the scratch slot);
    more chunks or longer ones than the step takes are refused in one line."""
    from mlx_bridge.deploy.runners.slots import SlotRunner
    from mlx_bridge.deploy.runners.steps import Chunk, RowSampling
    from mlx_bridge.errors import BridgeError

    a, b, c = (model.encode_prompt(PROMPTS[i]) for i in (0, 1, 3))
    assert len(c) > 2
    want = [model.complete([x], max_tokens=4)[0].token_ids for x in (a, b, c)]
    r = SlotRunner(model.module, rows=4, max_len=256, compile=False, graphs=False, mix=(4, 16))
    g = RowSampling()
    got: dict = {}

    def add(pending):
        for s, t in pending.tokens().items():
            got.setdefault(s, []).append(t)

    add(r.prefill([Chunk(0, a, 0, g)]))
    add(r.launch([0], len(a) + 1, True, chunks=[Chunk(1, b, 0, g)]))  # one lane
    add(r.launch([0, 1], len(a) + 2, True, chunks=[Chunk(2, c[:2], 0), Chunk(2, c[2:], 2, g)]))  # 4 lanes, 2 padding
    for i in range(3):
        add(r.launch([0, 1, 2], max(len(a), len(b), len(c)) + 3 + i, True))
    assert [got[s][:4] for s in range(3)] == want
    assert r.mix_lanes == (1, 4) and r.stats["mixed"] == 2
    with pytest.raises(BridgeError, match="mixed step"):
        r.launch([0], 40, True, chunks=[Chunk(3, [1] * 17, 0)])
    with pytest.raises(BridgeError, match="mixed step"):
        r.launch([0], 40, True, chunks=[Chunk(3, [1], i) for i in range(5)])


def test_a_decode_step_leaves_the_prompt_of_a_slot_still_prefilling_alone(model):
    """Separate prefill calls (mix=None), 8 tokens a round: the long prompt fills slot 0 while slot 1
    decodes, so each decode step computes slot 0 too; its idle key must not land on position 0 of the
    prompt written there (it did: an idle slot's position is 0)."""
    from mlx_bridge.serve.engine import Engine
    from mlx_bridge.serve.protocol import Sampling

    first, short, long = (model.encode_prompt(p) for p in (PROMPTS[1], PROMPTS[2], " ".join(PROMPTS * 3)))
    want = [model.complete([x], max_tokens=n)[0].token_ids for x, n in ((short, 40), (long, 12))]
    eng = Engine(model, max_batch=2, prefill_chunk=8, mix=None).start()
    greedy = lambda x, n: lambda m: ([x], Sampling(max_tokens=n, temperature=0.0))  # noqa: E731
    try:
        a, b = eng.submit(greedy(first, 2)), eng.submit(greedy(short, 40))  # slots 0 and 1
        a.future.result(timeout=60)
        until(lambda: eng.metrics.generation_tokens >= 6)
        c = eng.submit(greedy(long, 12))
        got = [b.future.result(timeout=120)[0].token_ids, c.future.result(timeout=120)[0].token_ids]
    finally:
        eng.stop()
    assert got == want


@pytest.mark.slow
def test_the_compiled_mixed_step_gives_each_rows_tokens(tmp_path):
    """The mixed step with the decode step's compiled halves (as on CUDA, here inductor on CPU): one
    lane, then 4 lanes (two pieces of one prompt, two padding), rows' tokens as `complete` alone."""
    from mlx_bridge import load
    from mlx_bridge.deploy.runners.slots import SlotRunner
    from mlx_bridge.deploy.runners.steps import Chunk, RowSampling

    m = load(tiny_hf_model(tmp_path / "llama", "llama"))
    m.eos_token_ids = set()
    a, b, c = (m.encode_prompt(PROMPTS[i]) for i in (0, 1, 3))
    want = [m.complete([x], max_tokens=4)[0].token_ids for x in (a, b, c)]
    r = SlotRunner(m.module, rows=4, max_len=256, compile=True, graphs=False, mix=(4, 16))
    g, got = RowSampling(), {}

    def add(pending):
        for s, t in pending.tokens().items():
            got.setdefault(s, []).append(t)

    add(r.prefill([Chunk(0, a, 0, g)]))
    add(r.launch([0], len(a) + 1, True))
    add(r.launch([0], len(a) + 2, True, chunks=[Chunk(1, b, 0, g)]))
    add(r.launch([0, 1], len(a) + 3, True, chunks=[Chunk(2, c[:2], 0), Chunk(2, c[2:], 2, g)]))
    for i in range(3):
        add(r.launch([0, 1, 2], max(len(a), len(b), len(c)) + 4 + i, True))
    assert r.use_compile and [got[s][:4] for s in range(3)] == want
