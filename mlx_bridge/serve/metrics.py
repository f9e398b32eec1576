"""The server's counters and histograms, rendered in Prometheus' text format (`GET /metrics`).

Names follow vLLM's where it has one (`vllm:num_requests_waiting` -> `mlx_bridge:num_requests_waiting`,
`vllm:time_to_first_token_seconds` -> `mlx_bridge:time_to_first_token_seconds`, ...). Updated by the
engine's worker thread, read by the event loop: each value is one Python number (no torn reads).

Example:
    >>> h = Histogram("x_seconds", "x", (0.1, 1.0)); h.observe(0.5)
    >>> h.render().splitlines()[2:5]
    ['x_seconds_bucket{le="0.1"} 0', 'x_seconds_bucket{le="1.0"} 1', 'x_seconds_bucket{le="+Inf"} 1']
"""

from __future__ import annotations

import bisect
import time
from collections import deque

PREFIX = "mlx_bridge:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v

    def render(self) -> str:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b}"}} {acc}')
        out += [f"{self.name}_sum {self.sum}", f"{self.name}_count {acc}"]
        return "\n".join(out)


class Metrics:
    """What `/metrics` shows: queue depth, running rows, tokens, request outcomes, TTFT and latency."""

    def __init__(self):
        self.waiting = 0  # requests queued or with rows still waiting for a slot
        self.running = 0  # rows holding a KV slot
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = {"finished": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.steps = 0
        self.max_running = 0
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from arrival to the first token.")
        self.latency = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.")
        self._recent: deque = deque()  # (time, tokens) of the last 10 s

    def generated(self, n: int) -> None:
        self.generation_tokens += n
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        recent = list(self._recent)
        if not recent:
            return 0.0
        span = max(time.monotonic() - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / max(span, 1.0)

    def as_dict(self) -> dict:
        return {"waiting": self.waiting, "running": self.running, "max_running": self.max_running,
                "steps": self.steps, "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens, **self.requests}

    def render(self, healthy: bool) -> str:
        def one(name, kind, help, value):
            return f"# HELP {PREFIX}{name} {help}\n# TYPE {PREFIX}{name} {kind}\n{PREFIX}{name} {value}"

        parts = [
            one("num_requests_waiting", "gauge", "Requests waiting for a KV slot.", self.waiting),
            one("num_requests_running", "gauge", "Rows decoding (holding a KV slot).", self.running),
            one("prompt_tokens_total", "counter", "Prompt tokens prefilled.", self.prompt_tokens),
            one("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
            one("generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.",
                round(self.tokens_per_second(), 3)),
            one("decode_steps_total", "counter", "Batched decode steps run.", self.steps),
            one("healthy", "gauge", "1 while the model can run.", int(healthy)),
            f"# HELP {PREFIX}requests_total Requests by outcome.\n# TYPE {PREFIX}requests_total counter\n" + "\n".join(
                f'{PREFIX}requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()),
            self.ttft.render(),
            self.latency.render(),
        ]
        return "\n".join(parts) + "\n"
