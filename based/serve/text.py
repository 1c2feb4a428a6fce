"""Text in and out of the server: tokenizers with a batch decoder, incremental detokenisation batched per
step, stop strings matched across token boundaries, and chat templates."""
from __future__ import annotations

import codecs
from pathlib import Path


def default_chat_template() -> str:
    """The chat template of checkpoints whose tokenizer has none (Jinja, as Hugging Face chat templates).

    Each message is `<|role|>` on its own line, then its content, then the eos token; the generation prompt
    is `<|assistant|>` and a newline, so the model's turn ends when it emits eos:

        <|system|>
        You are terse.<|endoftext|>
        <|user|>
        Hi<|endoftext|>
        <|assistant|>
    """
    return (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + (eos_token or '') + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )


def render_chat(template: str, messages: list[dict], eos_token: str | None, bos_token: str | None) -> str:
    """messages rendered with a chat template in Jinja's sandbox (as transformers' apply_chat_template)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, eos_token=eos_token or "", bos_token=bos_token or ""
    )


class ByteTokenizer:
    """Bytes as token ids (a preset with random weights has no tokenizer; vocab >= 256)."""

    eos_token_id = None
    eos_token = bos_token = None
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self):
        return stream_decoder(self)

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        out = []
        for ids in sequences:
            try:
                data = bytes(ids)
            except ValueError:  # ids above 255 (a larger vocabulary) are no byte: U+FFFD, as `based generate` prints
                data = bytes(i if i < 256 else 0xFF for i in ids)
            out.append(data.decode("utf-8", errors="replace"))
        return out


class HFTokenizer:
    """A checkpoint's tokenizer (local files only); decoding goes through the Rust decode_batch."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if (path / "tokenizer_config.json").is_file():
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:  # a bare tokenizers file
            self.tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        self.backend = self.tok.backend_tokenizer
        self.eos_token_id = self.tok.eos_token_id
        self.eos_token, self.bos_token = self.tok.eos_token, self.tok.bos_token
        self.chat_template = getattr(self.tok, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        return self.backend.decode_batch(sequences, skip_special_tokens=True)

    def decoder(self):
        return stream_decoder(self)


def load_tokenizer(checkpoint: Path | None):
    """The checkpoint's tokenizer when its folder has one, else bytes."""
    if checkpoint is not None and any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return HFTokenizer(checkpoint)
    return ByteTokenizer()


class Detokenizer:
    """Incremental detokenisation of many streams, one decode_batch call a step for all of them.

    Each stream keeps two offsets into its ids (as vLLM does): text is decoded from `prefix` (a few tokens
    back, so that a tokenizer that merges across tokens sees its context) and what lies past the text of
    ids[prefix:read] is new. A tail of U+FFFD is taken for a character whose bytes are still coming: it waits
    for the next token (the stream's end flushes it). Byte tokens need none of this: each stream has its own
    incremental UTF-8 decoder (one C call a step, which also tells a character still arriving from an
    invalid byte or an id past 255, so a random-weight model's stream never stalls).
    """

    def __init__(self, tokenizer):
        self.decode_batch = tokenizer.decode_batch
        self.bytes = isinstance(tokenizer, ByteTokenizer)

    def step(self, streams: list, final: list[bool]) -> list[str]:
        """New text of each stream (objects with .ids, .prefix, .read, .utf8); final streams flush their tail."""
        if not streams:
            return []
        if self.bytes:
            return [self._bytes(s, last) for s, last in zip(streams, final)]
        texts = self.decode_batch([s.ids[s.prefix:] for s in streams] + [s.ids[s.prefix:s.read] for s in streams])
        n = len(streams)
        out = []
        for s, full, before, last in zip(streams, texts[:n], texts[n:], final):
            if (not last and full.endswith("\ufffd")) or len(full) <= len(before):
                out.append("")
                continue
            out.append(full[len(before):])
            s.prefix, s.read = s.read, len(s.ids)
        return out

    @staticmethod
    def _bytes(s, last: bool) -> str:
        if s.utf8 is None:
            s.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        new, s.read = s.ids[s.read:], len(s.ids)
        try:
            data = bytes(new)
        except ValueError:
            data = bytes(i if i < 256 else 0xFF for i in new)
        return s.utf8.decode(data, last)


class _Stream:
    """What Detokenizer.step reads and advances for one stream."""

    def __init__(self):
        self.ids, self.prefix, self.read, self.utf8 = [], 0, 0, None


def stream_decoder(tokenizer):
    """A function ids -> new text for one stream (`based generate` prints with it): the server's incremental
    Detokenizer on a single stream, holding back a character whose bytes are still coming."""
    stream, detokenizer = _Stream(), Detokenizer(tokenizer)

    def push(new_ids):
        stream.ids.extend(new_ids)
        return detokenizer.step([stream], [False])[0]

    return push


class StopMatcher:
    """Stop strings found in a growing text, across token boundaries; what may be sent is held back while the
    text ends with the beginning of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_from: int) -> int | None:
        """Where the first stop string begins, looking at matches that end past new_from, else None."""
        if not self.stops:
            return None
        start = max(0, new_from - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def held(self, text: str) -> int:
        """Characters at the end of text that could begin a stop string. A tail of 32 or more characters is
        compared only where the stop string's first 32 occur (every length of tail was tried, in Python, each
        step: with a 100k-character stop string a long stream's steps took seconds, on the engine's thread)."""
        best, n = 0, len(text)
        for s in self.stops:
            most = min(self.longest - 1, len(s), n)
            head = s[:32]
            i = text.find(head, n - most) if most >= 32 else -1
            while 0 <= i and n - i >= 32:
                if s.startswith(text[i:]):
                    best = max(best, n - i)
                    break
                i = text.find(head, i + 1)
            for h in range(min(most, 31), best, -1):
                if s.startswith(text[-h:]):
                    best = h
                    break
        return best
