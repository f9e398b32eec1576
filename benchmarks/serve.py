"""Server batching: N concurrent requests against the same N one after another, through the `openai` client.

Starts `mlx-bridge serve`'s app (uvicorn, loopback) on a random tiny llama (or an export directory given
as DIR), sends N completion requests of T tokens each, streamed and not, first one by one (the anchor:
what a one-request-at-a-time server gives) and then all at once from N client threads, and prints the
wall times, the speed-up and the engine's batch statistics. EOS is switched off so that every request
runs to T tokens; answers are compared between the two runs.

    python benchmarks/serve.py                    # CPU, random 4-layer llama (hidden 256)
    python benchmarks/serve.py DIR --device cuda  # an export on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help="export directory (default: a random tiny llama)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", "-n", type=int, default=16)
    ap.add_argument("--tokens", "-t", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    a = ap.parse_args(argv)

    import httpx
    import openai

    from mlx_bridge import load
    from mlx_bridge.serve.app import ServerThread, create_app
    from mlx_bridge.testing.models import tiny_hf_model

    d = a.dir or tiny_hf_model(Path(tempfile.mkdtemp()) / "llama", "llama", hidden_size=256, intermediate_size=512,
                               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    model = load(d, device=a.device)
    model.eos_token_ids = set()  # every request runs to --tokens
    prompts = [f"prompt number {i} says" for i in range(a.requests)]
    rows = []
    with ServerThread(create_app(model, model_name="m", max_batch=a.max_batch)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)

        def ask(p, stream):
            r = client.completions.create(model="m", prompt=p, max_tokens=a.tokens, temperature=0, stream=stream)
            return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

        ask(prompts[0], False)  # warm-up
        for stream in (False, True):
            t = time.perf_counter()
            one = [ask(p, stream) for p in prompts]
            t_one = time.perf_counter() - t
            before = httpx.get(srv.url + "/health").json()["stats"]
            t = time.perf_counter()
            with ThreadPoolExecutor(a.requests) as pool:
                many = list(pool.map(lambda p: ask(p, stream), prompts))
            t_many = time.perf_counter() - t
            after = httpx.get(srv.url + "/health").json()["stats"]
            batches = after["batches"] - before["batches"]
            rows.append(("streamed" if stream else "plain", t_one, t_many, batches, after["max_rows"], one == many))
    print(f"# {a.requests} requests of {a.tokens} tokens, greedy, {model!r}, --max-batch {a.max_batch}\n")
    print("| requests | one by one s | concurrent s | speed-up | batches (concurrent) | largest batch | same answers |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for kind, t1, tn, b, mx, same in rows:
        print(f"| {kind} | {t1:.2f} | {tn:.2f} | {t1 / tn:.1f}x | {b} | {mx} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
