"""Loss, optimizer, schedule and the (compiled) training step.

The loss of an optimizer step is the mean cross-entropy over every loss target of its micro-batches:
each micro-batch returns the gradient of its summed cross-entropy, the sums are accumulated, and the
update divides by the total target count. So accumulating k micro-batches of b examples computes the
same update as one batch of k*b examples, and no padding position is ever counted.

Example:
    >>> opt = make_optimizer(TrainConfig(learning_rate=1e-3, lr_schedule="cosine", warmup=2), total_steps=10)
    >>> round(float(opt.learning_rate), 6)
    0.0
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from .config import TrainConfig


def loss_sum(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the targets where mask is 1, and the number of those targets."""
    logits = model(inputs)  # [B, L, V]
    ce = nn.losses.cross_entropy(logits, targets) * mask  # [B, L]
    return ce.astype(mx.float32).sum(), mask.sum()


def make_schedule(cfg: TrainConfig, total_steps: int):
    """Learning rate as a function of the optimizer step: linear warmup from 0, then constant/cosine/linear."""
    lr = cfg.learning_rate
    decay_steps = max(1, total_steps - cfg.warmup)
    if cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, cfg.min_lr)
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(lr, cfg.min_lr, decay_steps)
    else:
        main = lambda step: mx.array(lr, mx.float32)  # noqa: E731
    if cfg.warmup == 0:
        return main if cfg.lr_schedule != "constant" else lr
    return optim.join_schedules([optim.linear_schedule(0.0, lr, cfg.warmup), main], [cfg.warmup])


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    lr = make_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=cfg.weight_decay)
    return optim.Adam(learning_rate=lr)


class Stepper:
    """Runs micro-batches and optimizer updates; compiled with mx.compile unless `compile=False`.

    `micro(batch)` accumulates one micro-batch and returns (loss_sum, ntoks) as arrays; `update()`
    applies the accumulated gradient divided by the accumulated target count.

    `traces` counts the times mx.compile traced (and so compiled) a step function: their Python bodies
    run only then. It grows on the first step, again on the second (the optimizer's state now exists,
    so the compiled graph's inputs change) and on each new batch shape.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, compile: bool = True):
        self.model, self.optimizer = model, optimizer
        self.grad = None
        self.ntoks = None
        self.traces = 0
        vg = nn.value_and_grad(model, loss_sum)
        state = [model.state, optimizer.state, mx.random.state]

        def first(inputs, targets, mask):
            self.traces += compile
            (ls, n), g = vg(model, inputs, targets, mask)
            return ls, n, g

        def more(inputs, targets, mask, acc, acc_n):
            self.traces += compile
            (ls, n), g = vg(model, inputs, targets, mask)
            return ls, n + acc_n, tree_map(mx.add, g, acc)

        def apply(acc, acc_n):
            self.traces += compile
            optimizer.update(model, tree_map(lambda g: g / acc_n, acc))

        def one(inputs, targets, mask):  # grad_accum == 1: all in one graph
            self.traces += compile
            (ls, n), g = vg(model, inputs, targets, mask)
            optimizer.update(model, tree_map(lambda x: x / n, g))
            return ls, n

        wrap = partial(mx.compile, inputs=state, outputs=state) if compile else (lambda f: f)
        self._first, self._more, self._apply, self._one = wrap(first), wrap(more), wrap(apply), wrap(one)
        self.state = state

    def micro(self, inputs: mx.array, targets: mx.array, mask: mx.array, last: bool) -> tuple[mx.array, mx.array]:
        """One micro-batch; `last` closes the optimizer step (updates the parameters)."""
        if last and self.grad is None:
            ls, n = self._one(inputs, targets, mask)
            mx.eval(self.state, ls, n)
            return ls, n
        if self.grad is None:
            ls, self.ntoks, self.grad = self._first(inputs, targets, mask)
        else:
            ls, self.ntoks, self.grad = self._more(inputs, targets, mask, self.grad, self.ntoks)
        n = mask.sum()
        if last:
            self._apply(self.grad, self.ntoks)
            self.grad = self.ntoks = None
            mx.eval(self.state, ls, n)
        else:
            mx.eval(ls, n, self.grad, self.ntoks)
        return ls, n
