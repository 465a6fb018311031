"""Request parsing for the gateway: the OpenAI request bodies are validated against the `openai`
package's own TypedDicts (`CompletionCreateParams` of chat and of legacy completions), so field
names, types and enums track the API; what those types cannot say (bounds, what this gateway
supports) is checked here, and every refusal is an `APIError` in OpenAI's shape.

A field the API defines but the gateway cannot honour (tools, audio, images, ...) is a 400 naming
it, never silently dropped; so is a field the API does not define (OpenAI's own "Unrecognized
request argument supplied").
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from openai.types import completion_create_params as completion_params
from openai.types.chat import ChatCompletionMessageParam
from openai.types.chat import completion_create_params as chat_params
from pydantic import TypeAdapter, ValidationError

from lambdasplit.device.sampling import SamplingParams

MAX_STOPS = 4  # OpenAI's limit on `stop` sequences
MAX_TOP_LOGPROBS = 20  # chat `top_logprobs` (OpenAI: 0..20)
MAX_COMPLETION_LOGPROBS = 5  # legacy completions `logprobs` (OpenAI: 0..5)
MAX_DEPTH = 64  # nesting of the request's JSON (a JSON schema in `response_format` is the deepest field)
_SURROGATE = re.compile("[\ud800-\udfff]")

# (non-streaming, streaming) request types: `stream` is a Literal in each.
_CHAT = (chat_params.CompletionCreateParamsNonStreaming, chat_params.CompletionCreateParamsStreaming)
_COMPLETION = (completion_params.CompletionCreateParamsNonStreaming, completion_params.CompletionCreateParamsStreaming)
_ADAPTERS: dict[type, TypeAdapter] = {t: TypeAdapter(t) for t in _CHAT + _COMPLETION}


class APIError(Exception):
    """An error the gateway itself answers (bad request, wrong key, unknown model), in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


def unsupported(param: str, why: str = "") -> APIError:
    return bad_request(f"`{param}` is not supported by this gateway{': ' + why if why else ''}", param, "unsupported_parameter")


# Fields of the API that are accepted only at the value that means "off" (so a client library that
# always sends them still works); any other value is refused as unsupported.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "tool_choice": ("none",),
    "parallel_tool_calls": (False, True),  # meaningless without tools, which are refused
    "modalities": (["text"],),
    "store": (False,),
    "service_tier": ("auto", "default"),
}

# Supported fields; `user` (an end-user id for abuse monitoring) is accepted and does not change the output.
CHAT_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "stream",
    "stream_options", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "response_format", "user",
})
COMPLETION_FIELDS = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "echo", "best_of", "user",
})  # `suffix` (insertion) is refused


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token (0: only the chosen token), None: no logprobs
    json_schema: dict[str, Any] | None
    user: str | None = None  # the end user's id: under --pseudonymize/--decoys it keeps users' conversations apart


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]  # text, or token ids
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool = False
    json_schema: dict[str, Any] | None = field(default=None)


@dataclass(frozen=True)
class SamplingDefaults:
    """The model's own sampling settings (its generation_config.json), used where a request omits
    them, as vLLM does; without them OpenAI's defaults (temperature 1, top_p 1) apply."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 256  # where a request names none (create_app's default_max_tokens), not the model's

    @classmethod
    def from_generation_config(cls, config: Any) -> SamplingDefaults:
        """Only the values the file sets: transformers fills unset ones with its own defaults, which
        are not the model author's choice (e.g. top_k 50)."""
        values = config.to_diff_dict() if hasattr(config, "to_diff_dict") else dict(config)
        picked = {k: values[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if values.get(k) is not None}
        return cls(**picked)


def _validate(types: tuple[type, type], payload: Mapping[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """`payload` validated as the openai TypedDict of its kind (streaming or not), after refusing
    fields it does not define and fields this gateway does not support."""
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("`stream` must be a boolean", "stream")
    typed = types[1] if stream else types[0]
    fields = set(typed.__required_keys__) | set(typed.__optional_keys__)  # type: ignore[attr-defined]
    for name in payload:
        if name not in fields:
            raise bad_request(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
    for name, value in payload.items():
        if name in allowed or value is None:
            continue
        if name in _OFF_VALUES and value in _OFF_VALUES[name]:
            continue
        raise unsupported(name)
    try:
        return _materialize(_ADAPTERS[typed].validate_python(dict(payload)))
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _materialize(value: Any, path: tuple[str | int, ...] = ()) -> Any:
    """The openai TypedDicts declare lists as `Iterable`, which pydantic validates lazily: iterate
    them now so that every error is found before generation starts, named by its full path."""
    if isinstance(value, dict):
        return {k: _materialize(v, (*path, k)) for k, v in value.items()}
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, Iterable):
        try:
            items = list(value)
        except ValidationError as exc:
            raise _validation_error(exc, path) from None
        return [_materialize(v, (*path, i)) for i, v in enumerate(items)]
    return value


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal", "function-after", "function-plain"})


def _field_path(loc: tuple[Any, ...]) -> str:
    """A pydantic location as a dotted field path, without the union members it tried (type names
    such as `ChatCompletionUserMessageParam` or `list[int]`)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p[:1].isupper() or "[" in p or p in _TYPE_NAMES))]
    return ".".join(parts)


def _validation_error(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> APIError:
    problems = [(_field_path((*prefix, *e["loc"])), e["msg"]) for e in exc.errors()] or [("", "invalid request")]
    param = problems[0][0] or None
    seen: list[str] = []
    for where, msg in problems:
        text = f"{where or 'body'}: {msg}"
        if text not in seen:
            seen.append(text)
    return bad_request("; ".join(seen[:4]), param)


def _number(payload: Mapping[str, Any], name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = payload.get(name)
    if value is None:
        return default
    value = float(value)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_request(f"`{name}` must be in {bound}, got {value}", name)
    return value


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise bad_request(f"`stop` takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("`stop` sequences must not be empty", "stop")
    return tuple(stops)


def _logit_bias(bias: Any, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"`logit_bias` keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise bad_request(f"`logit_bias` token {token} is outside the vocabulary (0..{vocab_size - 1})", "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"`logit_bias` values must be in [-100, 100], got {value}", "logit_bias")
        out[token] = float(value)
    return out


def _sampling(payload: Mapping[str, Any], defaults: SamplingDefaults, vocab_size: int, max_tokens: int | None) -> SamplingParams:
    temperature = _number(payload, "temperature", 0.0, 2.0, defaults.temperature)
    count = payload.get("max_completion_tokens") or max_tokens
    if count is not None and count < 1:
        raise bad_request("`max_tokens` must be at least 1", "max_tokens")
    seed = payload.get("seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise bad_request(f"`seed` must be from 0 to 2**63 - 1, got {seed}", "seed")
    return SamplingParams(
        max_new_tokens=count or defaults.max_tokens,
        greedy=temperature == 0.0,
        temperature=temperature or 1.0,
        top_p=_number(payload, "top_p", 0.0, 1.0, defaults.top_p, low_open=True),
        top_k=defaults.top_k,
        repetition_penalty=defaults.repetition_penalty,
        seed=int(seed) if seed is not None else None,
        stop=_stops(payload.get("stop")),
        presence_penalty=_number(payload, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(payload, "frequency_penalty", -2.0, 2.0, 0.0),
        logit_bias=_logit_bias(payload.get("logit_bias"), vocab_size),
    )


def _count(payload: Mapping[str, Any], name: str, high: int) -> int:
    value = payload.get(name)
    value = 1 if value is None else int(value)
    if not 1 <= value <= high:
        raise bad_request(f"`{name}` must be from 1 to {high}, got {value}", name)
    return value


def _include_usage(payload: Mapping[str, Any]) -> bool:
    options = payload.get("stream_options")
    if options and not payload.get("stream"):
        raise bad_request("`stream_options` is only allowed with `stream: true`", "stream_options")
    return bool(options and options.get("include_usage"))


def _json_schema(format_: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema to constrain decoding to, or None for free text.

    `json_object` is refused: lm-format-enforcer's schema-less JSON mode lets a small model close an
    object after a trailing comma (invalid JSON), so it cannot be promised.
    """
    if not format_ or format_.get("type") == "text":
        return None
    if format_.get("type") == "json_schema":
        schema = (format_.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict) or not schema:
            raise bad_request("`response_format.json_schema.schema` must be a non-empty JSON schema", "response_format")
        return schema
    raise unsupported("response_format", f"type {format_.get('type')!r}; use json_schema with a schema")


def _message_text(message: Mapping[str, Any], index: int) -> str:
    """A message's content as one string: text parts joined with newlines (as vLLM does); other
    parts (images, audio, files) cannot reach a text-only model."""
    content = message.get("content")
    if content is None:
        if message.get("role") != "assistant":
            raise bad_request(f"messages[{index}].content must not be null", f"messages.{index}.content")
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise unsupported(f"messages.{index}.content.{part.get('type')}", "this model reads text parts only")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    if not messages:
        raise bad_request("`messages` must not be empty", "messages")
    out = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise unsupported(f"messages.{i}.{role if role in ('tool', 'function') else 'tool_calls'}", "tools are not supported")
        entry = {"role": "system" if role == "developer" else role, "content": _message_text(message, i)}
        if message.get("name"):
            entry["name"] = message["name"]
        out.append(entry)
    return out


def _object(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise bad_request("the request body must be a JSON object")
    _check_text(payload)
    return payload


def _check_text(payload: Mapping[str, Any]) -> None:
    """Every string of the body, keys included, is Unicode text, and the body is at most MAX_DEPTH deep.

    JSON can escape a lone UTF-16 surrogate ("\\ud800"); it decodes to a Python string that is not
    text: the tokenizer cannot encode it and no response can quote it (UTF-8 refuses it). Walked
    without recursion, so no nesting depth can exhaust the stack."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), payload)]
    while stack:
        path, value = stack.pop()
        if len(path) > MAX_DEPTH:
            raise bad_request(f"the request body is nested more than {MAX_DEPTH} levels deep", _dotted(path[:1]))
        if isinstance(value, str) and _SURROGATE.search(value):
            raise bad_request(f"`{_dotted(path)}` is not valid Unicode text (it holds a lone surrogate)", _dotted(path))
        if isinstance(value, Mapping):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    where = f"a field name in `{_dotted(path)}`" if path else "a field name"
                    raise bad_request(f"{where} is not valid Unicode text (it holds a lone surrogate)", _dotted(path) or None)
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in enumerate(value))


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(map(str, path))


def _content_shapes() -> dict[str, tuple[bool, frozenset[str]]]:
    """Per role of openai's `ChatCompletionMessageParam`: whether its content may be null, and the
    `type`s of the content parts it takes (read from the TypedDicts, so it tracks the API)."""
    shapes = {}
    for typed in typing.get_args(ChatCompletionMessageParam):
        hints = typing.get_type_hints(typed)
        options = typing.get_args(hints["content"]) or (hints["content"],)
        parts: set[str] = set()
        for option in options:
            if typing.get_origin(option) is Iterable:
                part = typing.get_args(option)[0]
                for member in typing.get_args(part) if typing.get_origin(part) is typing.Union else (part,):
                    parts.update(typing.get_args(typing.get_type_hints(member)["type"]))
        for role in typing.get_args(hints["role"]):
            shapes[role] = (type(None) in options, frozenset(parts))
    return shapes


_CONTENT_SHAPES = _content_shapes()


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_messages(messages: Any) -> None:
    """Each message's role and content shape as openai's message types define them, with one clear
    error naming the field: content is a string, or (where the role takes them) null or a list of
    content parts, each an object whose `type` the role takes, a text part with a string `text`.
    A part this gateway cannot read (an image) is valid here and refused as unsupported later."""
    if not isinstance(messages, list):
        raise bad_request(f"`messages` must be a list of message objects, got {_json_type(messages)}", "messages")
    roles = ", ".join(repr(r) for r in _CONTENT_SHAPES)
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, Mapping):
            raise bad_request(f"`{where}` must be a message object, got {_json_type(message)}", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in _CONTENT_SHAPES:
            raise bad_request(f"`{where}.role` must be one of {roles}, got {_json_type(role)}"
                              + (f" {role!r}" if isinstance(role, str) else ""), f"{where}.role")
        nullable, part_types = _CONTENT_SHAPES[role]
        content = message.get("content")
        if content is None:
            if not nullable:
                raise bad_request(f"`{where}.content` is required for a {role} message and must not be null", f"{where}.content")
        elif not isinstance(content, str) and not (isinstance(content, list) and part_types):
            kinds = "a string or a list of content parts" if part_types else "a string"
            raise bad_request(f"`{where}.content` must be {kinds}, got {_json_type(content)}", f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content.{j}", role, part_types)


def _check_part(part: Any, where: str, role: str, types: frozenset[str]) -> None:
    if not isinstance(part, Mapping):
        raise bad_request(f"`{where}` must be a content part object, got {_json_type(part)}", where)
    kind = part.get("type")
    if not isinstance(kind, str) or kind not in types:
        raise bad_request(f"`{where}.type` must be one of {', '.join(sorted(map(repr, types)))} in a {role} message, got "
                          f"{_json_type(kind)}" + (f" {kind!r}" if isinstance(kind, str) else ""), f"{where}.type")
    for name in ("text", "refusal"):
        if kind == name and not isinstance(part.get(name), str):
            raise bad_request(f"`{where}.{name}` must be a string, got {_json_type(part.get(name))}", f"{where}.{name}")


def parse_chat(payload: Any, defaults: SamplingDefaults, vocab_size: int, max_n: int) -> ChatRequest:
    """A chat request checked against openai's `CompletionCreateParams` and this gateway's limits."""
    payload = _object(payload)
    if "messages" in payload:
        _check_messages(payload["messages"])
    body = _validate(_CHAT, payload, CHAT_FIELDS)
    top = body.get("top_logprobs")
    if top is not None and not body.get("logprobs"):
        raise bad_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"`top_logprobs` must be from 0 to {MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
    return ChatRequest(
        model=body["model"],
        messages=_messages(body["messages"]),
        sampling=_sampling(body, defaults, vocab_size, body.get("max_tokens")),
        n=_count(body, "n", max_n),
        stream=bool(body.get("stream")),
        include_usage=_include_usage(body),
        logprobs=(top or 0) if body.get("logprobs") else None,
        json_schema=_json_schema(body.get("response_format")),
        user=body["user"] if isinstance(body.get("user"), str) else None,
    )


def _prompts(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    """OpenAI's four prompt shapes: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise bad_request("`prompt` must be a string, a list of strings, token ids or lists of token ids", "prompt")
    for p in prompts:
        if isinstance(p, list) and any(not 0 <= t < vocab_size for t in p):
            raise bad_request(f"`prompt` token ids must be in 0..{vocab_size - 1}", "prompt")
    return prompts


def parse_completion(payload: Any, defaults: SamplingDefaults, vocab_size: int, max_n: int) -> CompletionRequest:
    """A legacy completions request checked against openai's `CompletionCreateParams`."""
    payload = _object(payload)
    # The prompt is checked by _prompts: pydantic's lazy `Iterable[int]` would take [[1, 2]] for token ids.
    body = _validate(_COMPLETION, {**payload, "prompt": ""} if "prompt" in payload else payload, COMPLETION_FIELDS)
    echo = body.get("echo")
    n = _count(body, "n", max_n)
    if body.get("best_of") not in (None, 1, n):
        raise unsupported("best_of", "only best_of == n (no ranking of extra samples)")
    logprobs = body.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
        raise bad_request(f"`logprobs` must be from 0 to {MAX_COMPLETION_LOGPROBS}, got {logprobs}", "logprobs")
    if echo and logprobs is not None:
        raise unsupported("echo", "with logprobs (prompt logprobs are not computed)")
    return CompletionRequest(
        model=body["model"],
        prompts=_prompts(payload["prompt"], vocab_size),
        sampling=_sampling(body, defaults, vocab_size, body.get("max_tokens")),
        n=n,
        stream=bool(body.get("stream")),
        include_usage=_include_usage(body),
        logprobs=logprobs,
        echo=bool(echo),
    )
