"""Length-bucketed batches with an exact loss mask.

Each epoch shuffles the examples with `(seed, epoch)`, sorts windows of `WINDOW` batches by length, cuts
them into batches and shuffles the batches, so a batch holds examples of similar length and padding
costs little. A batch is padded only to its longest example (rounded up to `pad_multiple`, which keeps
the number of distinct shapes, and so of compiled step variants, small). Nothing is dropped: the last
batch of an epoch may be smaller. The order is a pure function of (seed, epoch), so a run resumed at
micro-batch k sees the same batches as one that never stopped.

Example:
    >>> import numpy as np
    >>> from mlx_bridge.train.templates import Example
    >>> ex = [Example(np.arange(n, dtype=np.int32), np.arange(n) >= 2) for n in (3, 5)]
    >>> b = collate(ex, [0, 1], pad_multiple=1)
    >>> b.inputs.shape, int(b.mask.sum()), b.ntoks
    ((2, 4), 4, 4)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .templates import Example

WINDOW = 64  # batches per length-sorted window


@dataclass
class Batch:
    inputs: np.ndarray  # (B, L) int32: tokens[:-1]
    targets: np.ndarray  # (B, L) int32: tokens[1:]
    mask: np.ndarray  # (B, L) float32: 1 where the target is a loss target (never on padding)
    ntoks: int  # loss targets in the batch
    real_tokens: int  # non-padding input tokens


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches (arrays of example indices) of one epoch, deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    chunk = batch_size * WINDOW
    batches = []
    for s in range(0, len(order), chunk):
        idx = order[s:s + chunk]
        idx = idx[np.argsort(lengths[idx], kind="stable")]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(examples: list[Example], idx, pad_multiple: int = 8, pad_id: int = 0) -> Batch:
    """Pad the examples `idx` into (inputs, targets, mask); the mask is exactly the examples' targets."""
    seqs = [examples[i] for i in idx]
    n = max(len(e.tokens) for e in seqs) - 1  # predictions per row
    n = max(1, -(-n // pad_multiple) * pad_multiple)
    tokens = np.full((len(seqs), n + 1), pad_id, np.int32)
    mask = np.zeros((len(seqs), n + 1), np.float32)
    for j, e in enumerate(seqs):
        tokens[j, :len(e.tokens)] = e.tokens
        mask[j, :len(e.mask)] = e.mask
    mask[:, 0] = 0.0
    return Batch(tokens[:, :-1], tokens[:, 1:], mask[:, 1:], int(mask.sum()),
                 int(sum(len(e.tokens) - 1 for e in seqs)))


class BatchStream:
    """Micro-batches across epochs, addressed by a global position (what resume restores)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_multiple: int = 8):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_multiple = pad_multiple
        self.lengths = np.array([len(e.tokens) for e in examples])
        self.per_epoch = -(-len(examples) // batch_size)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def batch(self, position: int) -> Batch:
        """The micro-batch at global position `position` (epoch = position // per_epoch)."""
        epoch, i = divmod(position, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, epoch_order(self.lengths, self.batch_size, self.seed, epoch))
        return collate(self.examples, self._cache[1][i], self.pad_multiple)


def eval_batches(examples: list[Example], batch_size: int, pad_multiple: int = 8, limit: int = -1):
    """Deterministic batches for validation: sorted by length, no shuffling; `limit` = -1 for all."""
    order = np.argsort([len(e.tokens) for e in examples], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b in batches if limit < 0 else batches[:limit]:
        yield collate(examples, b, pad_multiple)
