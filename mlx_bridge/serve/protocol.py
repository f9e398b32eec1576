"""OpenAI request parsing and response shapes for the server (no FastAPI, no torch here).

Requests are validated by hand so that every refusal is an OpenAI-shaped error naming the field
(`{"error": {"message", "type", "param", "code"}}`), never a framework's own 422 body.

Example:
    >>> req = parse_completion({"prompt": "hi", "max_tokens": 4, "temperature": 0}, limit=64)
    >>> req.sampling.max_tokens, req.sampling.temperature, req.n
    (4, 0.0, 1)
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4
MAX_N = 16


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request; requests with equal `Sampling` can share a batch."""

    max_tokens: int | None  # None: as many as the context leaves (chat default), fixed when the prompt is known
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def kwargs(self) -> dict:
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    seed=self.seed, stop=list(self.stop) or None)


@dataclass
class Request:
    kind: str  # "completion" | "chat"
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    prompts: list = field(default_factory=list)  # completion: each a str or a list of token ids
    messages: list[dict] | None = None  # chat


def parse_completion(body: dict, *, limit: int, defaults: dict | None = None) -> Request:
    """Validate a `/v1/completions` body (OpenAI fields; `top_k` as in vLLM)."""
    _refuse(body, {"echo": False, "suffix": None, "best_of": (None, 1), "logprobs": (None, 0)})
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                       param="prompt")
    return Request("completion", _sampling(body, limit, defaults, default_max=16), **_common(body), prompts=prompts)


def parse_chat(body: dict, *, limit: int, defaults: dict | None = None) -> Request:
    """Validate a `/v1/chat/completions` body; message content may be a string or text parts."""
    _refuse(body, {"logprobs": (None, False), "top_logprobs": None, "tools": (None, []), "functions": (None, []),
                   "tool_choice": (None, "none"), "function_call": (None, "none")})
    rf = body.get("response_format")
    if rf not in (None, {"type": "text"}):
        raise APIError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        if m.get("role") not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)} (got {m.get('role')!r})",
                           param=f"{where}.role")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"{where}.content")})
    s = _sampling(body, limit, defaults, default_max=None)
    return Request("chat", s, **_common(body), messages=out)


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where} must be a string or a list of text parts", param=where)


def _common(body: dict) -> dict:
    n = _num(body, "n", int, 1, lo=1, hi=MAX_N)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, "stream must be a boolean", param="stream")
    so = body.get("stream_options")
    if so is not None:
        if not stream:  # OpenAI and vLLM refuse it on a plain request
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        extra = sorted(set(so) - {"include_usage"}) if isinstance(so, dict) else None
        if extra is None or extra or not isinstance(so.get("include_usage", False), bool):
            raise APIError(400, "stream_options must be {'include_usage': true|false}" +
                           (f" (unknown key {extra[0]!r})" if extra else ""), param="stream_options")
    so = so or {}
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    return dict(n=n, stream=bool(stream), include_usage=so.get("include_usage", False), model=model)


def _sampling(body: dict, limit: int, defaults: dict | None, default_max: int | None) -> Sampling:
    d = defaults or {}
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if mt is None:
        max_tokens = None if default_max is None else min(default_max, limit)
    else:
        max_tokens = _num({name: mt}, name, int, None, lo=1)
        if max_tokens > limit:
            raise APIError(400, f"{name} is {max_tokens}; this server allows at most {limit}", param=name)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)) or len(stop) > MAX_STOP:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    for key in ("presence_penalty", "frequency_penalty"):
        if _num(body, key, float, 0.0, lo=-2.0, hi=2.0) != 0.0:
            raise APIError(400, f"{key} is not supported (only 0)", param=key)
    top_k = _num(body, "top_k", int, d.get("top_k", 0), lo=-1)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", float, float(d.get("temperature", 1.0)), lo=0.0, hi=2.0),
        top_p=_num(body, "top_p", float, float(d.get("top_p", 1.0)), lo=0.0, hi=1.0, open_lo=True),
        top_k=max(top_k, 0),
        seed=_num(body, "seed", int, None, lo=-(2 ** 63), hi=2 ** 63 - 1),
        stop=tuple(stop),
    )


def _num(body: dict, key: str, kind: type, default, *, lo=None, hi=None, open_lo: bool = False):
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) and not isinstance(v, bool) if kind is int else \
        isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok:
        raise APIError(400, f"{key} must be {'an integer' if kind is int else 'a number'} (got {v!r})", param=key)
    if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
        rng = f"{'(' if open_lo else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise APIError(400, f"{key} is {v}; it must be in {rng}", param=key)
    return kind(v)


def _refuse(body: dict, allowed: dict) -> None:
    """Fields this server cannot honour: refuse any value other than the neutral ones."""
    for key, ok in allowed.items():
        v = body.get(key)
        if v is None:
            continue
        neutral = ok if isinstance(ok, tuple) else (ok,)
        if not any(v == x and type(v) is type(x) for x in neutral if x is not None):
            raise APIError(400, f"{key}={v!r} is not supported by this server", param=key)


def check_work(req: Request, limit: int, max_tokens_limit: int) -> None:
    """400 when prompts x n x max_tokens (the tokens a request may make the server generate) is over
    `limit`; a chat request without max_tokens counts `max_tokens_limit`.

    Example:
        >>> check_work(parse_completion({"prompt": ["dog"] * 400, "n": 16}, limit=64), 65536, 64)
        Traceback (most recent call last):
        ...
        mlx_bridge.serve.protocol.APIError: this request asks for up to 400 prompts x n=16 x max_tokens=16 = 102400 tokens; this server allows at most 65536 per request (--max-request-tokens)
    """
    rows = max(1, len(req.prompts)) * req.n
    mt = req.sampling.max_tokens or max_tokens_limit
    if rows * mt > limit:
        raise APIError(400, f"this request asks for up to {max(1, len(req.prompts))} prompts x n={req.n} x "
                            f"max_tokens={mt} = {rows * mt} tokens; this server allows at most {limit} per "
                            "request (--max-request-tokens)", param="n" if req.n > 1 else "max_tokens",
                       code="request_too_large")


def context_error(prompt_tokens: int, max_tokens: int, context: int, param: str = "messages") -> APIError:
    """OpenAI's own message for a request longer than the model's context."""
    return APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                         f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                         "completion). Please reduce the prompt or the completion length.",
                    param=param, code="context_length_exceeded")


def fit_to_context(s: Sampling, prompt_tokens: int, context: int, limit: int, param: str = "prompt") -> Sampling:
    """Fix `max_tokens` for a prompt of `prompt_tokens`; raise `APIError` when it cannot fit.

    Example:
        >>> fit_to_context(Sampling(max_tokens=None), 10, context=64, limit=32).max_tokens
        32
    """
    if prompt_tokens == 0:
        raise APIError(400, "the prompt is empty (0 tokens)", param=param)
    if s.max_tokens is None:
        room = min(limit, context - prompt_tokens)
        if room < 1:
            raise context_error(prompt_tokens, 1, context, param)
        return replace(s, max_tokens=room)
    if prompt_tokens + s.max_tokens > context:
        raise context_error(prompt_tokens, s.max_tokens, context, param)
    return s


# -- responses -----------------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, rid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
             completion_tokens: int) -> dict:
    """A non-streamed answer; `choices` is [(text, finish_reason)] in index order."""
    if kind == "chat":
        items = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
                 for i, (t, f) in enumerate(choices)]
        obj = "chat.completion"
    else:
        items = [{"index": i, "text": t, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(choices)]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": items,
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk(kind: str, rid: str, model: str, index: int, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None) -> dict:
    """One streamed event in OpenAI's chunk format (`delta` for chat, `text` for completions)."""
    if kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
