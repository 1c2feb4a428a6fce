"""Request bodies of the OpenAI API as pydantic models (strict types, unknown fields refused) and its error body.

Fields OpenAI defines but this server does not implement (logprobs, echo, penalties, ...) are accepted only
at their neutral value, so a client that sends its defaults works and one that asks for more hears why not.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..generation.state import MAX_NEW_TOKENS

MAX_N = 64
MAX_STOP = 4
MAX_TOKENS = MAX_NEW_TOKENS  # beyond int64 the scheduler's counters overflowed (a 503)


def _check_text(field: str, texts: list[str]) -> None:
    """JSON may carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode: refused by name."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{field}: not valid Unicode text (a lone surrogate such as \\ud800); send UTF-8 "
                             f"text") from None


def error_body(message: str, param: str | None = None, type_: str = "invalid_request_error",
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = True


class Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=-1, description="0 or -1: all tokens")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    # OpenAI fields accepted at their neutral value only.
    logprobs: bool | int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"stop: at most {MAX_STOP} stop strings, got {len(self.stop)}")
        for name in ("logprobs", "frequency_penalty", "presence_penalty", "logit_bias"):
            value = getattr(self, name)
            # A completion's logprobs: 0 asks for the chosen tokens' log probabilities: only false is neutral.
            neutral = value is False if name == "logprobs" else value == 0 or value == {}
            if value is not None and not neutral:
                raise ValueError(f"{name}: not supported by this server (leave it out)")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1, le=MAX_TOKENS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value):
        # OpenAI also takes token ids (a list of ints, or a list of such lists): said so, not "a valid string".
        if isinstance(value, list) and any(isinstance(p, (int, list)) for p in value):
            raise ValueError("prompt: token ids are not supported by this server; send text (a string or a list "
                             "of strings)")
        return value

    @model_validator(mode="after")
    def _check_completion(self):
        if self.echo:
            raise ValueError("echo: not supported by this server (leave it out)")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: not supported by this server (leave it out or use n)")
        if self.suffix:
            raise ValueError("suffix: not supported by this server (leave it out)")
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or any(p == "" for p in prompts):
            raise ValueError("prompt: must not be empty")
        _check_text("prompt", prompts)
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value):
        """OpenAI's content parts, [{"type": "text", "text": ...}, ...]: their texts joined by newlines (as vLLM
        does); other parts (images, audio) refused by name."""
        if not isinstance(value, list):
            return value
        texts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                    and set(part) == {"type", "text"}):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content: part {i} ({kind!r}) is not a text part; this server takes a string or "
                                 f'text parts {{"type": "text", "text": ...}} only')
            texts.append(part["text"])
        return "\n".join(texts)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)

    @model_validator(mode="after")
    def _check_chat(self):
        _check_text("messages", [m.content for m in self.messages])
        return self


def field_of(loc: tuple) -> str:
    """'temperature' or 'messages.0.role' from a pydantic error location (without 'body')."""
    parts = [str(p) for p in loc if p != "body"]
    # Union members show up in the location (e.g. 'stop.str'): keep the field path only.
    kept = [p for p in parts if p not in ("str", "list[str]", "int", "float", "bool", "dict", "function-after",
                                          "list[function-after[_check(), Message]]")]
    return ".".join(kept) or "body"
