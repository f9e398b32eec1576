"""The server's startup heap is out of the garbage collector's reach while it serves.

A full collection walks every object alive holding the GIL, so the worker thread (and the device
behind it) stalls for as long as it takes over the model, its compiled functions and captured graphs.
The server freezes its startup heap before it says it is ready (as vLLM does after its warm-up) and
hands it back to the collector when the last server of the process stops."""

from __future__ import annotations

import gc

import httpx

from mlx_bridge.testing import tiny_hf_model


def walked(o) -> bool:
    """Whether the collector walks `o` (frozen objects are in no generation `gc.get_objects` lists)."""
    return any(x is o for x in gc.get_objects())


def test_the_startup_heap_is_frozen_while_serving_and_thawed_after(tmp_path):
    from mlx_bridge import load
    from mlx_bridge.serve.app import ServerThread, create_app

    model = load(tiny_hf_model(tmp_path / "llama", "llama"))
    assert walked(model.module)
    one, two = (create_app(model, model_name="m", max_batch=2) for _ in range(2))
    with ServerThread(one) as srv:
        assert not walked(model.module) and gc.get_freeze_count() > 0
        assert "objects frozen (a full collection took" in one.state.heap
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        with ServerThread(two):  # a second server in the process: its stop leaves the first one's heap frozen
            pass
        assert not walked(model.module)
    assert walked(model.module) and gc.get_freeze_count() == 0
