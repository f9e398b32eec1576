"""`export()`: an MLX model or checkpoint to a Hugging Face model directory or a PEFT adapter."""

from __future__ import annotations

import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import __version__
from ..errors import BridgeError
from ..formats.dtypes import OUTPUT_DTYPES
from ..fsutil import atomic_dir, check_output_dir, sha256_file
from ..manifest import Manifest
from ..probes import FILENAME as PROBES
from . import hf_config, peft
from .execute import parse_size, write_weights
from .plan import Plan, build_plan
from .source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, open_source

FORMATS = ("hf", "peft", "gguf")


def export(src: str | os.PathLike, out: str | os.PathLike, format: str = "hf", dtype: str = "auto",
           base: str | os.PathLike | None = None, shard_size: str | int = "5GB", dry_run: bool = False,
           force: bool = False, verify: bool | None = None, progress: bool = True, log=print,
           gguf_type: str | None = None, gguf_split: str | None = None) -> Path:
    """Export SRC (MLX model dir, mlx-lm adapter dir or checkpoint dir) to `out`.

    Args:
        src: MLX model directory, or adapter/checkpoint directory (base from its config or `base`).
        out: output directory (must not exist or be empty unless `force`).
        format: "hf" (adapter fused into a full model) or "peft" (adapter only).
        dtype: "auto" (keep the base's dtypes; untouched tensors byte for byte), or float32/float16/bfloat16.
        base: base model directory, overriding the adapter config / manifest.
        shard_size: largest shard, e.g. "5GB".
        dry_run: print the plan and write nothing.
        force: replace an existing output directory.
        verify: run `mlx_bridge.verify` on the result (None: when probes and torch are available).
        gguf_type: with format "gguf": q4_k_m, q5_k_m, q6_k, q8_0, q4_0, f16, bf16 or f32 (default f16).
        gguf_split: with format "gguf": split the file into gguf-split shards of at most this size.
    Returns:
        The output directory.
    Raises:
        BridgeError: bad input (named file and key); nothing is written.

    Example:
        >>> export("checkpoints/alpaca-lora", "deploy/alpaca", format="hf", dtype="bfloat16")  # doctest: +SKIP
        PosixPath('deploy/alpaca')
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise BridgeError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise BridgeError(f"--dtype {dtype!r}: expected auto or one of {', '.join(OUTPUT_DTYPES)}")
    parse_size(shard_size)
    if (gguf_type or gguf_split) and format != "gguf":
        raise BridgeError("--gguf-type / --gguf-split need --format gguf")
    if format == "gguf":
        from .gguf import check_gguf_type

        gguf_type = check_gguf_type(gguf_type or "f16")
        split = parse_size(gguf_split) if gguf_split else 0
    out = Path(out)
    if not dry_run:
        check_output_dir(out, force)
    source = open_source(src, base)
    try:
        if format == "peft" and source.adapter is None:
            raise BridgeError(f"{src}: --format peft needs an adapter or checkpoint directory, not a model directory")
        if format == "peft" and source.adapter.fine_tune_type == "full":
            raise BridgeError(f"{source.adapter.path / ADAPTER_CONFIG}: fine_tune_type 'full' has no PEFT form; use --format hf")
        if format == "gguf":
            return _export_gguf(source, src, out, gguf_type, split, dry_run, force, progress, log, t0)
        plan = build_plan(source, dtype)
        cfg, notes = hf_config.effective_config(source.base.config, plan.arch, plan.dtype)
        if format == "peft":
            tensors, modules, rank = peft.peft_tensors(plan, dtype)
            pcfg = peft.peft_config(plan, modules, rank, _base_ref(source))
            warnings = peft.vllm_warnings(pcfg, tensors)
            if source.base.quantization:
                warnings.append("the adapter was trained on a quantized base: PEFT on the full-precision HF base "
                                "differs slightly from what MLX computed; --format hf fuses into the exact dequantized base")
        if dry_run:
            if format == "peft":
                for t in tensors:
                    log(f"{t.name}  {list(t.shape)}  {t.dtype}  <- {t.ref}{' transposed' if t.transpose else ''}")
                log(f"# PEFT adapter: r={pcfg['r']} lora_alpha={pcfg['lora_alpha']:g} target_modules={pcfg['target_modules']}"
                    f" layers_to_transform={pcfg['layers_to_transform']}")
            else:
                log(plan.table())
            for n in notes:
                log(f"# config: {n}")
            return out
        for n in notes:
            log(f"note: {n}")
        with atomic_dir(out, force) as tmp:
            t1 = time.perf_counter()
            if format == "hf":
                write_weights(plan.items, tmp, shard_size, progress=progress)
                hf_config.write_config(tmp, cfg)
                hf_config.write_generation_config(source.base.path, tmp, cfg)
                _copy_tokenizer(source, tmp)
            else:
                peft.write_peft(tmp, plan, tensors, pcfg)
                for w in warnings:
                    print(f"warning: {w}", file=sys.stderr)
            t2 = time.perf_counter()
            if (source.path / PROBES).is_file():
                shutil.copyfile(source.path / PROBES, tmp / PROBES)
            (tmp / "README.md").write_text(hf_config.model_card(
                plan.arch, _base_ref(source), str(source.path) if source.adapter else None, plan.dtype, notes, format))
            _write_manifest(tmp, source, plan, format, notes, {"plan": t1 - t0, "write": t2 - t1},
                            warnings if format == "peft" else [])
        log(f"exported {src} -> {out} ({format}, {plan.dtype}, {time.perf_counter() - t0:.1f}s)")
        from .compat import check_export  # torch-free: what vLLM / TRT-LLM require of the dir

        for problem in check_export(out):
            print(f"warning: serving engines may refuse this export: {problem}", file=sys.stderr)
    finally:
        source.close()
    _maybe_verify(out, verify, format, log)
    return out


def _export_gguf(source, src, out: Path, gguf_type: str, split: int, dry_run: bool, force: bool, progress: bool,
                 log, t0: float) -> Path:
    """The --format gguf branch: one .gguf (or gguf-split shards) + Modelfile + README + manifest."""
    from .gguf import prepare_gguf

    job = prepare_gguf(source, gguf_type, Path(_base_ref(source)).name)  # general.name, as convert_hf_to_gguf names it
    try:
        if dry_run:
            log(job.table())
            for n in job.notes:
                log(f"# config: {n}")
            return out
        with atomic_dir(out, force) as tmp:
            t1 = time.perf_counter()
            files = job.write(tmp, split, progress)
            t2 = time.perf_counter()
            (tmp / "README.md").write_text(job.readme(files, _base_ref(source), str(source.path) if source.adapter else None))
            _write_manifest(tmp, source, job.plan, "gguf", job.notes, {"plan": t1 - t0, "write": t2 - t1}, job.warnings)
            m = Manifest.load(tmp)
            m.export.update(dtype=gguf_type, fused_in="float32")  # the plan's float32 is the fuse, not the file
            m.save(tmp)
    finally:
        job.close()
    for n in job.notes:
        log(f"note: {n}")
    log(f"exported {src} -> {out} (gguf {gguf_type}: {', '.join(f.name for f in files)}, {time.perf_counter() - t0:.1f}s)")
    return out


def _base_ref(source) -> str:
    m = source.manifest.base_model if source.manifest else {}
    if source.adapter is not None:
        return m.get("hub_id") or source.adapter.config.get("model") or str(source.base.path)
    return m.get("hub_id") or str(source.base.path)


def _copy_tokenizer(source, out: Path) -> None:
    copied = hf_config.copy_tokenizer(source.base.path, out)
    if source.adapter is not None:  # a checkpoint may carry its own (e.g. a changed chat template)
        copied += hf_config.copy_tokenizer(source.path, out)
    if not copied:
        print(f"warning: {source.base.path}: no tokenizer files found; the export has no tokenizer", file=sys.stderr)


def _hash_files(*groups: list[Path]) -> list[dict[str, str]]:
    """{file name: sha256} per group, files hashed on both cores at once (largest first)."""
    paths = sorted({p for g in groups for p in g}, key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        digest = dict(zip(paths, pool.map(sha256_file, paths)))
    return [{p.name: digest[p] for p in g} for g in groups]


def _write_manifest(out: Path, source, plan: Plan, format: str, notes: list[str], seconds: dict,
                    warnings: list[str]) -> None:
    t = time.perf_counter()
    m = Manifest.from_dict(source.manifest.to_dict()) if source.manifest else Manifest()
    m.kind = "export"
    base_files = [f.path for f in source.base.files]
    src_files = base_files + ([source.adapter.file.path] if source.adapter else [])
    out_files = sorted(p for p in out.iterdir() if p.is_file())
    if not m.architecture:
        m.architecture = {"model_type": plan.arch.model_type, "layout": "mlx-lm"}
    if not m.base_model:
        m.base_model = {"path": str(source.base.path), "config": source.base.config,
                        "quantization": source.base.quantization}
    if source.adapter is not None and not m.adapter:
        lp = source.adapter.lora
        m.adapter = {"type": source.adapter.fine_tune_type, "rank": lp.get("rank"), "scale": source.adapter.scale,
                     "lora_alpha": (source.adapter.scale * lp["rank"]) if lp.get("rank") else None,
                     "dropout": lp.get("dropout"), "modules": plan.adapter_modules}
    src_hashes, out_hashes = _hash_files(src_files, out_files)
    m.export = {
        "format": format, "dtype": plan.dtype, "source": str(source.path), "base": str(source.base.path),
        "arch": plan.arch.model_type, "architecture": plan.arch.architecture,
        "source_sha256": src_hashes, "files": out_hashes,
        "tensors": {"total": len(plan.items), "copied": sum(i.is_copy for i in plan.items)},
        "config_notes": notes, "warnings": warnings, "mlx_bridge": __version__,
        "seconds": {**{k: round(v, 3) for k, v in seconds.items()}, "hash": round(time.perf_counter() - t, 3)},
    }
    m.files = out_hashes
    m.save(out)


def _maybe_verify(out: Path, verify: bool | None, format: str, log) -> None:
    if verify is False or format != "hf" or not (out / PROBES).is_file():
        return
    try:
        import torch  # noqa: F401
        from ..verify import verify as run_verify
    except ImportError as e:
        if verify:
            raise BridgeError(f"--verify needs the deploy extra (torch): {e}") from None
        log(f"note: not verifying ({e}); run `mlx-bridge verify {out}` where torch is installed")
        return
    report = run_verify(out)
    log(f"parity: {report.get('summary', report)}")
