"""The OpenAI wire format: request validation and response objects, independent of the HTTP layer.

Field names follow OpenAI's API and vLLM's extensions to it (`chat_template_kwargs.enable_thinking`, `top_k`,
reasoning split into `reasoning_content`). Everything that can be checked without the tokenizer is checked
here, before a request joins the queue, so a bad request is answered at once.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

ROLES = {"system", "user", "assistant", "tool", "developer"}


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Call:
    """A validated request. `max_tokens` None = whatever room the context leaves (vLLM's default)."""

    chat: bool
    model: str
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    thinking: bool | None = None
    echo: bool = False
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, stop, seed (None = default)


def parse(body: Any, chat: bool, names: list[str], context_limit: int | None) -> Call:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    model = body.get("model") or names[0]  # like vLLM: a missing model means the served one
    if model not in names:
        raise APIError(404, f"The model `{model}` does not exist. This server serves: {', '.join(names)}.",
                       "model", "model_not_found")
    call = Call(chat=chat, model=model, stream=_bool(body, "stream", False))
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise APIError(400, "`stream_options` must be an object.", "stream_options")
        call.include_usage = _bool(options, "include_usage", False, "stream_options.include_usage")
    _unsupported(body, chat)
    if chat:
        call.messages = _messages(body.get("messages"))
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise APIError(400, "`chat_template_kwargs` must be an object.", "chat_template_kwargs")
        # vLLM's chat_template_kwargs.enable_thinking; the top-level form is DashScope's (Qwen's own API)
        call.thinking = _bool(kwargs or {}, "enable_thinking", None, "chat_template_kwargs.enable_thinking")
        if call.thinking is None:
            call.thinking = _bool(body, "enable_thinking", None)
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        call.prompts = _prompts(body.get("prompt"))
        call.echo = _bool(body, "echo", False)
        key = "max_tokens"
    call.max_tokens = _int(body, key, None, low=1, high=context_limit)
    call.sampling = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, open_low=True),
        "top_k": _top_k(body),
        "stop": _stop(body),
        "seed": _int(body, "seed", None),
        "ignore_eos": _bool(body, "ignore_eos", None),  # vLLM's extension (benchmarks ask for fixed lengths)
    }
    return call


# A token rarely holds more characters than this: a prompt whose first limit x this many characters already
# hold more tokens than the context is refused without tokenizing the rest (10 MB took 13 s to tokenize)
PROBE_CHARS_PER_TOKEN = 16


def count_prompt(count: Callable[[str], int], text: str, limit: int | None, param: str) -> int:
    """The prompt's tokens (`count` is the engine's tokenizer); a 400 at once for a prompt so long that its
    beginning alone exceeds the context."""
    probe = None if limit is None else limit * PROBE_CHARS_PER_TOKEN
    if probe is not None and len(text) > probe:
        head = count(text[:probe])
        if head > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, the {param} "
                                f"holds more: {head} tokens in its first {probe} of {len(text)} characters. "
                                f"Please reduce the length of the {param}.", param, "context_length_exceeded")
    return count(text)


def check_length(prompt_tokens: int, max_tokens: int | None, limit: int | None, param: str) -> int:
    """The max_tokens to run with, or a 400 when prompt + completion cannot fit the context."""
    room = None if limit is None else limit - prompt_tokens
    wanted = max_tokens if max_tokens is not None else room
    if room is not None and (wanted is None or wanted > room or room < 1):
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + (wanted or 0)} tokens ({prompt_tokens} in the {param}, {wanted or 0} in the "
            f"completion). Please reduce the length of the {param} or of max_tokens.",
            param, "context_length_exceeded",
        )
    return wanted if wanted is not None else 16  # no limit known anywhere: OpenAI's completions default


# --- responses -------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def reasoning_fields(reasoning: str | None) -> dict[str, Any]:
    # reasoning_content is what vLLM's Qwen3 parser emitted and most clients read; vLLM >= 0.11 renamed it to
    # `reasoning`. Both, so either kind of client finds it.
    return {"reasoning_content": reasoning, "reasoning": reasoning}


def chat_response(call: Call, rid: str, content: str, reasoning: str, finish: str, prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, **reasoning_fields(reasoning or None)}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": call.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(call: Call, rid: str, created: int, delta: dict | None = None, finish: str | None = None,
               usage_: dict | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": call.model}
    # OpenAI's include_usage: a last chunk with no choices carries the usage; the others carry usage null
    chunk["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                   "logprobs": None}]
    if call.include_usage:
        chunk["usage"] = usage_
    return chunk


def completion_chunk(call: Call, rid: str, created: int, index: int | None = None, text: str = "",
                     finish: str | None = None, usage_: dict | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": call.model}
    chunk["choices"] = [] if index is None else [{"index": index, "text": text, "finish_reason": finish,
                                                   "logprobs": None}]
    if call.include_usage:
        chunk["usage"] = usage_
    return chunk


# --- field checks ----------------------------------------------------------------------------------------
def _bool(d: dict, key: str, default: Any, param: str | None = None) -> Any:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"`{param or key}` must be true or false, not {value!r}.", param or key)
    return value


def _int(d: dict, key: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"`{key}` must be an integer, not {value!r}.", key, "invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high} (the context length)"
        raise APIError(400, f"`{key}` is {value}; it must be {bounds}.", key, "invalid_value")
    return value


def _number(d: dict, key: str, low: float, high: float, open_low: bool = False) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"`{key}` must be a number, not {value!r}.", key, "invalid_type")
    if value > high or value < low or (open_low and value == low):
        lo = f"greater than {low:g}" if open_low else f"at least {low:g}"
        raise APIError(400, f"`{key}` is {value}; it must be {lo} and at most {high:g}.", key, "invalid_value")
    return float(value)


def _top_k(body: dict) -> int | None:
    value = _int(body, "top_k", None, low=-1)
    return None if value is None else max(value, 0)  # vLLM's -1 and our 0 both mean "off"


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "`stop` must be a string or a list of non-empty strings.", "stop", "invalid_type")
    return stops


def _unsupported(body: dict, chat: bool) -> None:
    # Refuse what the Engine protocol cannot do rather than silently ignore it.
    if body.get("n", 1) != 1 or body.get("best_of", 1) not in (1, None):
        raise APIError(400, "Only n=1 is supported.", "n", "unsupported")
    for key in ("logprobs", "top_logprobs", "suffix", "logit_bias"):
        if body.get(key) not in (None, False, {}):
            raise APIError(400, f"`{key}` is not supported by qwenhw serve.", key, "unsupported")
    if chat and body.get("tools"):
        raise APIError(400, "Tool calling is not supported by qwenhw serve yet.", "tools", "unsupported")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise APIError(400, "Only response_format {\"type\": \"text\"} is supported.", "response_format",
                       "unsupported")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise APIError(400, f"`{key}` is not supported by qwenhw serve (leave it 0).", key, "unsupported")


def _messages(messages: Any) -> list[dict]:
    if messages is None:
        raise APIError(400, "`messages` is required.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` must be a non-empty list.", "messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"{param} must be an object with a role among {sorted(ROLES)}.", param)
        role = "system" if m["role"] == "developer" else m["role"]
        # reasoning fields of earlier assistant turns are dropped: Qwen's history holds answers only
        out.append({"role": role, "content": _text(m.get("content"), f"{param}.content", role)})
    return out


def _text(content: Any, param: str, role: str) -> str:
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"{param}: only text content parts are supported.", param, "unsupported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"{param} must be a string or a list of text parts.", param, "invalid_type")


def _prompts(prompt: Any) -> list[str]:
    if prompt is None:
        raise APIError(400, "`prompt` is required.", "prompt", "missing_required_parameter")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "`prompt` must be a string or a non-empty list of strings (token ids are not "
                            "supported).", "prompt", "invalid_type")
    return prompts
