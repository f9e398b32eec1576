"""Progress bars, `training_log.jsonl` and the loss-curve PNG.

Records are dicts: a step record {"step", "loss", "tokens", "lr", "tokens_per_sec", "peak_memory_gb",
"epoch", "seconds"} and a validation record {"step", "val_loss", "val_ppl"}. The first step of each
`train()` call (the start-up step: it compiles the step, and on a GPU its kernels) also carries
"startup": true and the backend and device it ran on; `speed` keeps it apart from steady-state speed.
The log lives in memory and is written with each checkpoint, so the log of a checkpoint matches its
weights (a resumed run reads it back and continues it).

Example:
    >>> log = TrainLog()
    >>> log.add({"step": 1, "loss": 2.5}); log.add({"step": 1, "val_loss": 2.4, "val_ppl": 11.0})
    >>> log.last("val_loss")
    2.4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class TrainLog:
    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = list(records or [])

    def add(self, record: dict) -> None:
        self.records.append(record)

    def last(self, key: str):
        for r in reversed(self.records):
            if key in r:
                return r[key]
        return None

    def steps(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    def write_jsonl(self, path: Path) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    @classmethod
    def read_jsonl(cls, path: Path) -> "TrainLog":
        if not path.is_file():
            return cls()
        return cls([json.loads(line) for line in path.read_text().splitlines() if line.strip()])

    def plot(self, path: Path, title: str = "") -> None:
        """Train loss per step (faint), its moving average over `smoothing_window` steps, and the
        validation loss as points (matplotlib, Agg backend)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        tr = self.steps()
        if tr:
            x, y = [r["step"] for r in tr], [r["loss"] for r in tr]
            ax.plot(x, y, lw=0.8, alpha=0.3, color="C0", label="train")
            w = smoothing_window(len(y))
            if w > 1:
                ax.plot(x, smooth(y, w), lw=1.5, color="C0", label=f"train, mean of {w} steps")
        va = [r for r in self.records if "val_loss" in r]
        if va:
            ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", ms=4, color="C1", label="valid")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (response tokens)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def speed(steps: list[dict]) -> dict:
    """Start-up apart from steady state, over step records (a resumed run's log included).

    startup_seconds: wall time of the start-up steps (the first step of each `train()` call, with its
    kernel builds, and every step that traced and compiled the step function: the second too, once the
    optimizer's state exists, and any new batch shape); steady_tokens_per_sec: input tokens / seconds
    of every other step.

    Example:
        >>> speed([{"seconds": 60.0, "input_tokens": 100, "startup": True}, {"seconds": 0.5, "input_tokens": 2000}])
        {'startup_seconds': 60.0, 'startup_steps': 1, 'steady_tokens_per_sec': 4000.0, 'steady_steps': 1}
    """
    cold = [r for r in steps if r.get("startup")]
    warm = [r for r in steps if not r.get("startup")]
    secs = sum(r["seconds"] for r in warm)
    return {"startup_seconds": round(sum(r["seconds"] for r in cold), 3), "startup_steps": len(cold),
            "steady_tokens_per_sec": sum(r["input_tokens"] for r in warm) / secs if secs else None,
            "steady_steps": len(warm)}


def smoothing_window(n: int) -> int:
    """Steps averaged in the plotted train curve: about a twentieth of the run, at most 50."""
    return max(1, min(50, n // 20))


def smooth(y: list[float], w: int) -> list[float]:
    """Trailing moving average (the first points average what there is so far).

    Example:
        >>> smooth([1.0, 3.0, 5.0, 7.0], 2)
        [1.0, 2.0, 4.0, 6.0]
    """
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc += v
        if i >= w:
            acc -= y[i - w]
        out.append(acc / min(i + 1, w))
    return out


def phase(iterable, desc: str, total: int | None = None, quiet: bool = False):
    """A progress bar for a phase (validation, probes, tokenizing) that shows up only when it takes more
    than two seconds and goes away when it ends.

    Example:
        >>> sum(phase(range(3), "demo", quiet=True))
        3
    """
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=quiet, delay=2, leave=False, file=sys.stderr,
                dynamic_ncols=True)


class Progress:
    """A tqdm bar over optimizer steps: loss, steady-state tokens/s, start-up time, learning rate, peak memory.

    The tokens/s shown is the mean over this run's steps after the start-up step; until that step ends the
    bar says it is starting up (compiling).
    """

    def __init__(self, total: int, initial: int = 0, quiet: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=quiet, unit="step", dynamic_ncols=True,
                        file=sys.stderr, desc="train")
        self.bar.set_postfix_str("start-up: first step (compiling)", refresh=False)
        self.startup = 0.0
        self.warm_tokens, self.warm_seconds = 0, 0.0

    def step(self, r: dict) -> None:
        self.bar.update(1)
        if r.get("startup"):
            self.startup += r["seconds"]
        else:
            self.warm_tokens += r["input_tokens"]
            self.warm_seconds += r["seconds"]
        gb = r["peak_memory_gb"]
        peak = f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1024:.0f} MB"
        tps = f"{self.warm_tokens / self.warm_seconds:,.0f} tok/s" if self.warm_seconds else "tok/s after start-up"
        self.bar.set_postfix_str(f"loss {r['loss']:.3f} | {tps} | start-up {self.startup:.1f} s | "
                                 f"lr {r['lr']:.2e} | peak {peak}", refresh=False)

    def write(self, msg: str) -> None:
        if not self.bar.disable:
            self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
