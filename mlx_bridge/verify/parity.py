"""Parity of an export with what MLX computed: logits and greedy continuations of the probes.

The reference is the `probes.safetensors` the export carries (golden MLX outputs saved with the
checkpoint), or, with `against=`, outputs computed now by mlx-lm. The deployed model (PyTorch) runs the
same token ids:

- logits: max and mean |difference| over every probe position; a position is within tolerance when
  its max is at most atol + rtol * max|reference logit|, with (atol, rtol) set by the coarser of the
  two dtypes. In float32 every position must be; in half precision (and TF32) up to 2% of them may not
  (rounding can flip a near-tie, e.g. a MoE router's choice of expert, which moves that position as a whole);
- greedy: each probe's continuation is generated again (no EOS stop). A continuation that leaves the
  reference's passes only at a near-tie: re-scoring the reference tokens, the deployed model's margin
  between its own choice and the reference's is within the same logit limit.

`verify` writes the report as `parity.json` into the export directory and its result into the model card.

Example:
    >>> report = verify("deploy/alpaca")        # doctest: +SKIP
    >>> report["passed"], report["logits"]["max_abs_diff"]  # doctest: +SKIP
    (True, 3.1e-06)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..errors import BridgeError
from ..fsutil import scratch_dir, write_atomic
from ..probes import FILENAME as PROBES, Probes
from ..translate.card import write_parity

REPORT = "parity.json"
# (atol, rtol) on logits for the coarser dtype of reference and deployed model. "tfloat32": float32 weights
# whose matmuls ran in TF32 (10-bit mantissa, as float16): a float32 model's probes made on MLX's CUDA backend
TOLERANCES = {"float32": (1e-3, 1e-3), "tfloat32": (1e-2, 1e-2), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2)}
# share of probe positions allowed over the limit (a flipped near-tie moves a whole position)
OUTLIERS = {"float32": 0.0, "tfloat32": 0.02, "float16": 0.02, "bfloat16": 0.02}
PRECISION = ["float32", "tfloat32", "float16", "bfloat16"]  # finer -> coarser
DEFAULT_PROMPTS = ["Give three tips for staying healthy.", "What is two plus two?", "Hello, how are you today?",
                   "Write one sentence about the sea."]


def coarser(*dtypes: str) -> str:
    """The least precise of these dtype names (unknown names count as float32)."""
    known = [d for d in dtypes if d in TOLERANCES]
    return max(known, key=PRECISION.index) if known else "float32"


def tolerance(*dtypes: str) -> tuple[float, float]:
    """(atol, rtol) for comparing logits computed in these dtypes.

    Example:
        >>> tolerance("float32", "bfloat16")
        (0.05, 0.05)
    """
    return TOLERANCES[coarser(*dtypes)]


def compare_logits(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float, outliers: float = 0.0) -> dict:
    """Max/mean |diff|, top-1 agreement and pass/fail of two (N, L, V) logit arrays; up to a share
    `outliers` of the positions may exceed the limit."""
    if ref.shape != got.shape:
        raise BridgeError(f"{PROBES}: reference logits {ref.shape} but the model gives {got.shape} "
                          "(vocabulary size differs from the probes')")
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    ref_max = float(np.nanmax(np.abs(np.where(np.isfinite(ref), ref, np.nan)), initial=0.0))
    limit = atol + rtol * ref_max
    per_position = diff.max(-1)  # [N, L]
    # a NaN/Inf logit on either side is never within tolerance (NaN - NaN compares as not over)
    bad = ~np.isfinite(ref).all(-1) | ~np.isfinite(got).all(-1)
    per_position = np.where(bad, np.inf, per_position)
    over, allowed = int((per_position > limit).sum()), int(outliers * per_position.size)
    return {"max_abs_diff": float(per_position.max()), "non_finite_positions": int(bad.sum()), "mean_abs_diff": float(diff.mean()), "max_abs_reference": ref_max,
            "atol": atol, "rtol": rtol, "limit": limit, "positions": int(per_position.size),
            "positions_over_limit": over, "allowed_over_limit": allowed,
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "passed": over <= allowed}


def compare_greedy(model, input_ids: np.ndarray, ref: np.ndarray, limit: float) -> dict:
    """Re-generate each probe's greedy continuation with `model` and compare with `ref` (N, G)."""
    import torch

    N, G = ref.shape
    if G == 0:  # probes saved without greedy continuations
        return {"exact": N, "of": N, "max_new_tokens": 0, "agreement": 1.0, "near_ties": 0, "per_probe": [],
                "passed": True}
    got = [c.token_ids for c in model.complete([list(map(int, r)) for r in input_ids], max_tokens=G,
                                               temperature=0.0, ignore_eos=True)]
    L = input_ids.shape[1]
    scored = model.logits(torch.as_tensor(np.concatenate([input_ids, ref], 1)[:, :-1], dtype=torch.long)).cpu().numpy()
    per = []
    for i in range(N):
        g = got[i] + [-1] * (G - len(got[i]))  # shorter only when the context ran out
        j = next((k for k in range(G) if g[k] != int(ref[i, k])), None)
        if j is None:
            per.append({"match": G, "first_divergence": None, "margin": None, "near_tie": None})
            continue
        row = scored[i, L - 1 + j]
        margin = float(row.max() - row[int(ref[i, j])])  # how far the reference token is from the top
        per.append({"match": j, "first_divergence": j, "margin": margin, "near_tie": bool(margin <= limit)})
    exact = sum(p["first_divergence"] is None for p in per)
    return {"exact": exact, "of": N, "max_new_tokens": G, "agreement": float(np.mean([p["match"] / G for p in per])),
            "near_ties": sum(bool(p["near_tie"]) for p in per), "per_probe": per,
            "passed": all(p["first_divergence"] is None or p["near_tie"] for p in per)}


def _default_inputs(model, n_tokens: int = 16) -> np.ndarray:
    rows = [model.encode_prompt(p) for p in DEFAULT_PROMPTS]
    L = min(n_tokens, min(len(r) for r in rows))
    return np.array([r[:L] for r in rows], np.int32)


def verify(export_dir: str | os.PathLike, against: str | os.PathLike | None = None, *, device: str = "cpu",
           dtype: str = "auto", backend: str = "auto", atol: float | None = None, rtol: float | None = None,
           max_new_tokens: int = 16, write: bool = True, model=None, log=None,
           base: str | os.PathLike | None = None) -> dict:
    """Check an export against MLX's outputs; write `parity.json` into it; return the report.

    Args:
        export_dir: the export (Hugging Face layout, with `probes.safetensors` unless `against`).
        against: checkpoint or MLX model directory to compute fresh MLX outputs from (needs mlx).
        device, dtype, backend: how to load the export (see `mlx_bridge.load`).
        atol, rtol: override the dtype's logit tolerance.
        max_new_tokens: greedy tokens per probe when the probes are made here (`against` without probes).
        write: write `parity.json`.
        model: an already loaded `DeployedModel` of `export_dir` (skips loading).
        log: called with a line as each phase starts (after loading: logits, greedy), e.g. `print`.
        base: for a PEFT adapter directory, the MLX base model it applies to (default: the one its
            manifest names); the adapter is merged into it with PEFT's formulas (`peft_merge`) and run.
    Returns:
        the report (see `parity.json`): "passed", "logits", "greedy", ...
    Raises:
        BridgeError: no probes and no `against`, mlx missing for `against`, unloadable export.

    Example:
        >>> verify("deploy/alpaca", against="ckpt/alpaca")["passed"]  # doctest: +SKIP
        True
    """
    d = Path(export_dir)
    from .peft_merge import is_peft_dir, merged_dir

    if model is not None or not is_peft_dir(d):
        return _verify(d, against, device, dtype, backend, atol, rtol, max_new_tokens, write, model, None, log)
    with scratch_dir("mlx-bridge-peft") as t:
        merged = merged_dir(d, t / "merged", base)
        return _verify(d, against, device, dtype, backend, atol, rtol, max_new_tokens, write, None, merged, log)


def _verify(d: Path, against, device, dtype, backend, atol, rtol, max_new_tokens, write, model, merged, log) -> dict:
    t0 = time.perf_counter()

    def phase(msg: str) -> None:
        if log is not None:
            log(f"parity: {msg} ({time.perf_counter() - t0:.1f}s)")

    if model is None:
        from ..deploy.loader import load

        model = load(merged or d, device=device, dtype=dtype, backend=backend)  # bad input: its one-line error
        phase(f"loaded {d} in PyTorch ({model.backend}, {model.device}, {str(model.dtype).replace('torch.', '')})")
    have_probes = (d / PROBES).exists()
    if against is None and not have_probes:
        raise BridgeError(f"{d}: no {PROBES} (the checkpoint was saved without probes); "
                          "pass --against CHECKPOINT_OR_MLX_DIR to compute MLX outputs now")
    if against is not None:
        from .mlx_ref import mlx_probes

        saved = Probes.load(d) if have_probes else None
        inputs = saved.input_ids if saved is not None else _default_inputs(model)
        G = saved.greedy.shape[1] if saved is not None and saved.greedy.shape[1] else max_new_tokens
        phase(f"computing the MLX reference with {against}")
        probes, source = mlx_probes(against, inputs, G), "mlx-lm"
    else:
        probes, source = Probes.load(d), PROBES
    deployed_dtype = str(model.dtype).replace("torch.", "")
    coarse = coarser(probes.dtype, deployed_dtype)
    a, r = TOLERANCES[coarse]
    a, r = atol if atol is not None else a, rtol if rtol is not None else r
    import torch

    N, L = probes.input_ids.shape
    phase(f"logits of {N} probes x {L} tokens")
    got = model.logits(torch.as_tensor(probes.input_ids, dtype=torch.long)).cpu().numpy()
    logits = compare_logits(probes.logits, got, a, r, OUTLIERS[coarse])
    phase(f"greedy continuations of {N} probes ({probes.greedy.shape[1]} tokens each)")
    greedy = compare_greedy(model, probes.input_ids, probes.greedy, logits["limit"])
    long = None
    if probes.long_input_ids is not None:  # past the sliding window / rope-scaling threshold
        K = probes.long_logits.shape[1]
        got_long = model.logits(torch.as_tensor(probes.long_input_ids, dtype=torch.long))[:, -K:].cpu().numpy()
        long = dict(compare_logits(probes.long_logits, got_long, a, r, OUTLIERS[coarse]),
                    length=int(probes.long_input_ids.shape[1]), positions_compared=int(K))
    from ..manifest import environment

    report = {
        "schema_version": 1, "passed": logits["passed"] and greedy["passed"] and (long is None or long["passed"]),
        "export_dir": str(d),
        "reference": {"source": source, "against": str(against) if against is not None else None,
                      "dtype": probes.dtype},
        "deployed": {"backend": model.backend, "device": str(model.device), "dtype": deployed_dtype,
                     **({"peft": "adapter merged into its base with PEFT's formulas (verify/peft_merge.py)"}
                        if merged else {})},
        "probes": {"num": int(probes.input_ids.shape[0]), "length": int(probes.input_ids.shape[1]),
                   "max_new_tokens": int(probes.greedy.shape[1])},
        "logits": logits, "greedy": greedy, "long_probe": long, "environment": environment(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    report["tolerance"] = {"dtype": coarse, "atol": a, "rtol": r, "limit": logits["limit"],
                           "outliers_allowed": OUTLIERS[coarse],
                           "rule": "|logit diff| <= atol + rtol * max|reference logit| at every probe position "
                                   "(up to outliers_allowed of them over); greedy tokens equal or a near-tie"}
    report["summary"] = (f"{'PASS' if report['passed'] else 'FAIL'}: logits max |diff| {logits['max_abs_diff']:.3g} "
                         f"(limit {logits['limit']:.3g} = {a:g} + {r:g} x {logits['max_abs_reference']:.3g}, {coarse}); "
                         f"greedy {greedy['exact']}/{greedy['of']} identical"
                         + (f"; long probe ({long['length']} tokens) max |diff| {long['max_abs_diff']:.3g}"
                            if long else ""))
    if write:
        _write_json(d / REPORT, report)
        write_parity(d, report)  # the model card's parity section
    return report


def _write_json(p: Path, obj: dict) -> None:
    write_atomic(p, json.dumps(obj, indent=2) + "\n")


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    lg, gr, dp = report["logits"], report["greedy"], report["deployed"]
    ref = report["reference"]
    lines = [
        f"parity of {report['export_dir']} ({dp['backend']}, {dp['device']}, {dp['dtype']}) against "
        f"{ref['source']} (MLX {ref['dtype']}): {report['probes']['num']} probes x {report['probes']['length']} tokens",
        f"  logits: max |diff| {lg['max_abs_diff']:.3g} (limit {lg['limit']:.3g} = atol {lg['atol']:g} + rtol "
        f"{lg['rtol']:g} x max|logit| {lg['max_abs_reference']:.3g}), mean {lg['mean_abs_diff']:.3g}, "
        f"top-1 agreement {100 * lg['top1_agreement']:.1f}%"
        + (f"; {lg['positions_over_limit']}/{lg['positions']} positions over the limit "
           f"({lg['allowed_over_limit']} allowed)" if lg["positions_over_limit"] else ""),
        f"  greedy: {gr['exact']}/{gr['of']} continuations identical ({gr['max_new_tokens']} tokens each)"
        + (f", {gr['near_ties']} diverge at a near-tie" if gr["near_ties"] else ""),
        *([f"  long probe: {lp['length']} tokens (past the sliding window / rope-scaling threshold), last "
           f"{lp['positions_compared']} positions: max |diff| {lp['max_abs_diff']:.3g} (limit {lp['limit']:.3g})"]
          if (lp := report.get("long_probe")) else []),
        "PASS" if report["passed"] else "FAIL",
    ]
    return "\n".join(lines)
