"""`export()`: an MLX model or checkpoint to a Hugging Face model directory or a PEFT adapter."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .. import __version__
from ..errors import BridgeError, CheckFailed
from ..formats.dtypes import OUTPUT_DTYPES
from ..fsutil import atomic_dir, check_apart, check_output_dir, write_atomic
from ..hashing import DEFAULT, StreamHasher, algorithm_of, check_hashes, hash_file
from ..manifest import Manifest
from ..probes import FILENAME as PROBES
from . import card, hf_config, peft
from .execute import parse_size, source_spans, write_weights
from .plan import Plan, build_plan
from .source_hash import SourceHasher, fed_share
from .source import ADAPTER_CONFIG, open_source

FORMATS = ("hf", "peft", "gguf")


def export(src: str | os.PathLike, out: str | os.PathLike, format: str = "hf", dtype: str = "auto",
           base: str | os.PathLike | None = None, hf_base: str | os.PathLike | None = None,
           shard_size: str | int = "5GB", dry_run: bool = False, force: bool = False, verify: bool | None = None,
           progress: bool = True, log=print, allow_base_mismatch: bool = False, keep_failed: bool = False,
           gguf_type: str | None = None, gguf_split: str | None = None) -> Path:
    """Export SRC (MLX model dir, mlx-lm adapter dir or checkpoint dir) to `out`.

    Nothing appears under `out` unless the whole export succeeded, its parity check included: a
    failed check raises `CheckFailed` (exit 1) and leaves `out` as it was.

    Args:
        src: MLX model directory, or adapter/checkpoint directory (base from its config or `base`).
        out: output directory (must not exist or be empty unless `force`; never the source, inside it
            or above it).
        format: "hf" (adapter fused into a full model) or "peft" (adapter only).
        dtype: "auto" (keep the base's dtypes; untouched tensors byte for byte), or float32/float16/bfloat16.
        base: base model directory, overriding the adapter config / manifest.
        hf_base: the Hugging Face checkpoint the MLX base came from; tensors mlx-lm drops (vision
            towers of multimodal types) are copied from it byte for byte.
        shard_size: largest shard, e.g. "5GB".
        dry_run: print the plan and write nothing.
        force: replace an existing output directory.
        verify: run `mlx_bridge.verify` on the result before it is put in place (None: when probes
            and torch are available).
        allow_base_mismatch: accept a base whose weight files are not the ones the checkpoint's
            manifest records (its weight hashes).
        keep_failed: when the parity check fails, keep the output as `OUT.failed` for inspection.
        gguf_type: with format "gguf": q4_k_m, q5_k_m, q6_k, q8_0, q4_0, f16, bf16 or f32 (default f16).
        gguf_split: with format "gguf": split the file into gguf-split shards of at most this size.
    Returns:
        The output directory.
    Raises:
        BridgeError: bad input (named file and key); nothing is written.
        CheckFailed: the parity check failed; nothing is written under `out`.

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
    check_apart(out, src)
    if not dry_run:
        check_output_dir(out, force)
    source = open_source(src, base, hf_base)
    hashing, stop = ThreadPoolExecutor(min(2, os.cpu_count() or 1)), threading.Event()
    out_hasher = StreamHasher()  # the shards' hashes, computed from the bytes as they are written
    src_hasher = None  # the base's hashes, from the bytes the hf export reads anyway
    try:
        check_apart(out, source.base.path, "the base model")
        if verify and not (source.path / PROBES).is_file():
            raise BridgeError(f"--verify: {source.path} has no {PROBES} (MLX outputs saved with a checkpoint) to "
                              f"check against; export, then `mlx-bridge verify OUT --against {source.path}`")
        checked, want = {}, {}
        if source.manifest is not None and source.adapter is not None:
            checked = check_hashes(source.path, source.manifest.files)
            want = source.manifest.base_model.get("weight_hashes") or {}
        # the base is hashed in the algorithm the checkpoint's manifest recorded it in (to compare)
        base_algo = algorithm_of(want, f"{source.path / 'manifest.json'}: base_model.weight_hashes")
        # the source is hashed on both cores while the export runs (one read of each byte); an hf
        # export's base files are started once the plan says which it reads in file order (below)
        fed_mode = format == "hf" and not dry_run
        base_files = [f.path for f in source.base.files]
        src_sha = _start_hashing(hashing, [] if fed_mode else base_files, stop, algo=base_algo)
        if source.adapter:
            src_sha.update(_start_hashing(hashing, [source.adapter.file.path], stop,
                                          {source.path / n: h for n, h in checked.items()}))
        if format == "peft" and source.adapter is None:
            raise BridgeError(f"{src}: --format peft needs an adapter or checkpoint directory, not a model directory")
        if format == "peft" and source.adapter.fine_tune_type == "full":
            raise BridgeError(f"{source.adapter.path / ADAPTER_CONFIG}: fine_tune_type 'full' has no PEFT form; use --format hf")
        if format == "gguf":
            return _export_gguf(source, src, out, gguf_type, split, dry_run, force, progress, log, t0, src_sha,
                                allow_base_mismatch)
        plan = build_plan(source, dtype)
        cfg, notes = hf_config.effective_config(source.base.config, plan.arch, plan.dtype)
        if source.hf_base is not None:  # what mlx-lm left out of its config (vision_config ...)
            cfg.update({k: v for k, v in source.hf_base.config.items() if k not in cfg})
        if format == "peft":
            tensors, modules, rank = peft.peft_tensors(plan, dtype)
            pcfg = peft.peft_config(plan, modules, rank, _base_ref(source))
            warnings = peft.vllm_warnings(pcfg, tensors)
            if source.base.quantization:
                warnings.append("the adapter was trained on a quantized base: PEFT on the full-precision HF base "
                                "differs slightly from what MLX computed; --format hf fuses into the exact dequantized base")
        if dry_run:
            _check_base(source, src_sha, allow_base_mismatch)
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
        if fed_mode:
            src_hasher, rest = _source_hasher(plan, base_files, base_algo)
            src_sha.update(_start_hashing(hashing, rest, stop, algo=base_algo))
        with atomic_dir(out, force, log=lambda s: print(f"note: {s}", file=sys.stderr)) as tmp:
            t1 = time.perf_counter()
            if format == "hf":
                write_weights(plan.items, tmp, shard_size, progress=progress, hasher=out_hasher,
                              source_hasher=src_hasher if src_hasher.paths else None)
                src_sha.update(src_hasher.finish(stop))
                hf_config.write_config(tmp, cfg)
                hf_config.write_generation_config(source.base.path, tmp, cfg)
                _copy_tokenizer(source, tmp)
            else:
                peft.write_peft(tmp, plan, tensors, pcfg)
                _copy_tokenizer(source, tmp)  # PEFT's and vLLM's loaders read a tokenizer beside the adapter
                for w in warnings:
                    print(f"warning: {w}", file=sys.stderr)
            t2 = time.perf_counter()
            if (source.path / PROBES).is_file():
                shutil.copyfile(source.path / PROBES, tmp / PROBES)
            base_ref = _base_ref(source)
            mismatch = _check_base(source, src_sha, allow_base_mismatch)
            if mismatch:  # name the base actually used
                base_ref = str(source.base.path)
                if format == "peft":
                    peft.write_config(tmp, dict(pcfg, base_model_name_or_path=base_ref))
            (tmp / card.FILENAME).write_text(_card(source, plan, notes, format, out, base_ref, mismatch))
            from .compat import check_export  # torch-free: what vLLM / TRT-LLM require of the dir

            for problem in check_export(tmp):
                print(f"warning: serving engines may refuse this export: {problem}", file=sys.stderr)
            _maybe_verify(tmp, out, verify, log, keep_failed, source.base.path)
            _write_manifest(tmp, source, plan, format, notes, {"plan": t1 - t0, "write": t2 - t1},
                            warnings if format == "peft" else [], src_sha, out_hasher.digests())
        log(f"exported {src} -> {out} ({format}, {plan.dtype}, {time.perf_counter() - t0:.1f}s)")
    finally:
        stop.set()  # every hash the export needed is done; a refused one does not wait for the rest
        hashing.shutdown(wait=True, cancel_futures=True)
        out_hasher.close()
        if src_hasher is not None:
            src_hasher.close()
        source.close()
    return out


def _card(source, plan: Plan, notes: list[str], format: str, out: Path, base_ref: str, mismatch: bool) -> str:
    base_id = (card.hub_id_of(base_ref) if mismatch else  # not the manifest's base: name only the one used
               card.base_hub_id(source.manifest, source.adapter.config.get("model") if source.adapter else None,
                                base_ref))
    title = f"{out.name}: {plan.arch.architecture}" + (" + adapter" if format == "peft" else "")
    return card.model_card(title=title, fmt=format, dtype=plan.dtype, base_ref=base_ref, base_id=base_id,
                           manifest=source.manifest, notes=notes, name=out.name)


def _start_hashing(pool: ThreadPoolExecutor, paths: list[Path], stop=None, known: dict[Path, str] | None = None,
                   algo: str = DEFAULT) -> dict[Path, Future]:
    """{path: future hash in `algo`}, largest files first (so both cores stay busy to the end); those in
    `known` (just checked against a manifest) not hashed again."""
    out: dict[Path, Future] = {}
    for p in sorted(set(paths), key=lambda p: -p.stat().st_size):
        if known and p in known:
            out[p] = Future()
            out[p].set_result(known[p])
        else:
            out[p] = pool.submit(hash_file, p, algo, stop=stop)
    return out


def _source_hasher(plan: Plan, files: list[Path], algo: str, share: float = 0.5) -> tuple[SourceHasher, list[Path]]:
    """(a SourceHasher for the base files the export reads mostly in file order, the other files): those
    are hashed from the bytes the export reads (each byte read once), the others on their own from the
    start (a file MLX wrote keeps its tensors in hash-map order: hashed from pieces, most of it would be
    read at the end, after the writing, instead of beside it)."""
    spans = source_spans(plan.items)
    fed = [p for p in files if fed_share(spans.get(p, []), p.stat().st_size) >= share]
    return SourceHasher(fed, algo), [p for p in files if p not in fed]


def _check_base(source, src_sha: dict[Path, Future], allow: bool) -> bool:
    """Refuse a base whose weight files are not the ones the checkpoint was trained on (its manifest's
    weight hashes, compared in their algorithm); with `allow`, warn and return True."""
    want = (source.manifest.base_model.get("weight_hashes") if source.manifest and source.adapter else None) or {}
    if not want:
        return False
    got = {f.path.name: src_sha[f.path].result() for f in source.base.files}
    differ = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
    if not differ:
        return False
    msg = (f"{source.base.path}: weight files differ from the base the checkpoint was trained on "
           f"({len(differ)} of {len(set(want) | set(got))}: {', '.join(differ[:3])}; hashes in {source.path / 'manifest.json'})")
    if not allow:
        raise BridgeError(msg + "; pass --allow-base-mismatch to export onto this base anyway")
    print(f"warning: {msg}; exporting anyway (--allow-base-mismatch)", file=sys.stderr)
    return True


def _export_gguf(source, src, out: Path, gguf_type: str, split: int, dry_run: bool, force: bool, progress: bool,
                 log, t0: float, src_sha: dict[Path, Future], allow_base_mismatch: bool) -> Path:
    """The --format gguf branch: one .gguf (or gguf-split shards) + Modelfile + README + manifest."""
    from .gguf import prepare_gguf

    job = prepare_gguf(source, gguf_type, Path(_base_ref(source)).name)  # general.name, as convert_hf_to_gguf names it
    try:
        if dry_run:
            log(job.table())
            for n in job.notes:
                log(f"# config: {n}")
            return out
        mismatch = _check_base(source, src_sha, allow_base_mismatch)
        base_ref = str(source.base.path) if mismatch else _base_ref(source)
        with atomic_dir(out, force, log=lambda s: print(f"note: {s}", file=sys.stderr)) as tmp:
            t1 = time.perf_counter()
            files = job.write(tmp, split, progress)
            t2 = time.perf_counter()
            (tmp / "README.md").write_text(job.readme(files, base_ref, str(source.path) if source.adapter else None))
            _write_manifest(tmp, source, job.plan, "gguf", job.notes, {"plan": t1 - t0, "write": t2 - t1}, job.warnings,
                            src_sha, {p.name: h for p, h in job.hashes.items()})
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


def _hash_files(paths: list[Path], known: dict[str, str]) -> dict[str, str]:
    """{file name: hash} of the files: `known` ones as given, the rest hashed on both cores at once."""
    todo = [p for p in paths if p.name not in known]
    with ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        futures = _start_hashing(pool, todo)
        return {p.name: known[p.name] if p.name in known else futures[p].result() for p in paths}


def _write_manifest(out: Path, source, plan: Plan, format: str, notes: list[str], seconds: dict,
                    warnings: list[str], src_sha: dict[Path, Future], written: dict[str, str]) -> None:
    t = time.perf_counter()
    m = Manifest.from_dict(source.manifest.to_dict()) if source.manifest else Manifest()
    m.kind = "export"
    out_files = sorted(p for p in out.iterdir() if p.is_file() and p.name != card.FILENAME)  # verify fills it in
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
    src_hashes = {p.name: f.result() for p, f in sorted(src_sha.items())}
    out_hashes = _hash_files(out_files, written)
    m.export = {
        "format": format, "dtype": plan.dtype, "source": str(source.path), "base": str(source.base.path),
        "arch": plan.arch.model_type, "architecture": plan.arch.architecture,
        "source_hashes": src_hashes, "files": out_hashes,
        "tensors": {"total": len(plan.items), "copied": sum(i.is_copy for i in plan.items)},
        "config_notes": notes, "warnings": warnings, "mlx_bridge": __version__,
        "seconds": {**{k: round(v, 3) for k, v in seconds.items()}, "hash": round(time.perf_counter() - t, 3)},
    }
    m.files = out_hashes
    m.save(out)


def _maybe_verify(tmp: Path, out: Path, verify: bool | None, log, keep_failed: bool, base: Path) -> None:
    """Verify the finished export in its temporary directory (before it gets its name; a PEFT adapter
    merged into `base`); a failure raises `CheckFailed`, the output kept only as `OUT.failed` with
    `keep_failed`."""
    if verify is False or not (tmp / PROBES).is_file():
        return
    try:
        import torch  # noqa: F401
        from ..verify.parity import REPORT, verify as run_verify
    except ImportError as e:
        if verify:
            raise BridgeError(f"--verify needs the deploy extra (torch): {e}") from e
        log(f"note: not verifying ({e}); run `mlx-bridge verify {out}` where torch is installed")
        return
    report = run_verify(tmp, write=False, base=base, log=log)
    report["export_dir"] = str(out)
    write_atomic(tmp / REPORT, json.dumps(report, indent=2) + "\n")
    card.write_parity(tmp, report)  # the model card's parity section
    log(f"parity: {report['summary']}")
    if report["passed"]:
        return
    kept = ""
    if keep_failed:
        failed = out.parent / f"{out.name}.failed"
        if (failed / REPORT).is_file():  # an earlier failed output of this tool
            shutil.rmtree(failed)
        if failed.exists():
            kept = f"; {failed} exists, so the failed output was not kept"
        else:
            os.rename(tmp, failed)
            kept = f"; the failed output is kept in {failed}"
    raise CheckFailed(f"{out}: not written: the export does not compute what MLX computed "
                      f"({report['summary']}){kept}")
