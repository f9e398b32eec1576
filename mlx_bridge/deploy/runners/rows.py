"""`RowRunner`: `slots.SlotRunner`'s continuous-batching interface for models without a slot pool."""

from __future__ import annotations

from typing import Callable

import torch

from .sampling import pick
from .slots import LANES
from .steps import Chunk, Pending, RowSampling, seed31


class RowRunner:
    """`SlotRunner`'s interface over per-row runners (`make()` -> an object with `start`/`next`):
    one cache per row, decoded one row after another. For what has no slot pool: transformers
    models, MoE layers, layers over several GPUs.

    Example:
        >>> r = RowRunner(lambda: copy.copy(model.runner), rows=4, max_len=512, device="cpu")  # doctest: +SKIP
    """

    def __init__(self, make: Callable, *, rows: int, max_len: int, device, vocab_size: int):
        self.make, self.rows, self.max_len, self.device = make, rows, max_len, torch.device(device)
        self.vocab_size = vocab_size
        self.stats = {"captures": 0, "steps": 0, "prefills": 0}
        self._rows: dict[int, dict] = {}

    def prepare(self) -> str:
        return "one row at a time (no slot pool for this model)"

    def fits(self, lengths: list[int]) -> bool:
        return len(lengths) <= LANES[-1]

    def prefill(self, chunks: list[Chunk]) -> Pending:
        got = torch.zeros(len(chunks), dtype=torch.long)
        for i, ch in enumerate(chunks):
            first = self._prefill(ch.slot, ch.tokens, ch.start, ch.sampling)
            if first is not None:
                got[i] = first
        self.stats["prefills"] += 1
        return Pending({ch.slot: i for i, ch in enumerate(chunks) if ch.sampling is not None}, got)

    def _prefill(self, slot: int, tokens: list[int], start: int, sampling: RowSampling | None) -> int | None:
        row = self._rows.setdefault(slot, {"prompt": []})
        if start == 0:
            row.clear()
            row["prompt"] = []
        row["prompt"] += list(tokens)
        if sampling is None:
            return None
        dev = self.device
        with torch.inference_mode():
            ids = torch.tensor([row["prompt"]], dtype=torch.long, device=dev)
            row["runner"] = runner = self.make()
            logits = runner.start(ids, torch.zeros(1, dtype=torch.long, device=dev), self.max_len)
            long = dict(dtype=torch.long, device=logits.device)
            row["s"] = (torch.tensor([float(sampling.temperature)], device=logits.device),
                        torch.tensor([float(sampling.top_p)], device=logits.device),
                        torch.tensor([int(sampling.top_k)], **long), torch.tensor([seed31(sampling.seed)], **long))
            row["stream"], row["n"] = torch.tensor([int(sampling.stream)], **long), 0
            return self._pick(row, logits)

    def _pick(self, row: dict, logits: torch.Tensor) -> int:
        counter = torch.tensor([row["n"]], dtype=torch.long, device=logits.device)
        row["n"] += 1
        row["tok"] = int(pick(logits, *row["s"], counter, row["stream"]))
        return row["tok"]

    def launch(self, slots: list[int], need: int, greedy: bool) -> Pending:
        got = torch.zeros(max(slots) + 1, dtype=torch.long)
        with torch.inference_mode():
            for s in slots:
                row = self._rows[s]
                logits = row["runner"].next(torch.tensor([row["tok"]], device=self.device))
                got[s] = self._pick(row, logits)
        self.stats["steps"] += 1
        return Pending({s: s for s in slots}, got)

    def free(self, slot: int) -> None:
        self._rows.pop(slot, None)
