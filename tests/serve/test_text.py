"""Incremental batched detokenisation, stop strings across token boundaries, the default chat template."""
from __future__ import annotations

import random

import pytest

from based.serve.text import ByteTokenizer, Detokenizer, StopMatcher, default_chat_template, render_chat

TEXT = "Les élèves mangent des crêpes — 日本語のテキスト, emoji 🙂🙃 and plain ASCII words.\n" * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from based.data.tokenizer import train_tokenizer
    from based.serve.text import HFTokenizer

    path = tmp_path_factory.mktemp("bpe")
    train_tokenizer([TEXT], 300, path)
    return HFTokenizer(path)


class Stream:
    def __init__(self):
        self.ids, self.prefix, self.read, self.utf8 = [], 0, 0, None


def _incremental(tokenizer, sequences, rng):
    """Feed each sequence a few tokens a step, all streams through one Detokenizer; returns their texts."""
    detok = Detokenizer(tokenizer)
    streams = [Stream() for _ in sequences]
    texts = ["" for _ in sequences]
    cursor = [0] * len(sequences)
    while any(c < len(s) for c, s in zip(cursor, sequences)):
        live = [i for i, (c, s) in enumerate(zip(cursor, sequences)) if c < len(s)]
        final = []
        for i in live:
            n = rng.randint(1, 3)
            streams[i].ids.extend(sequences[i][cursor[i]:cursor[i] + n])
            cursor[i] += n
            final.append(cursor[i] >= len(sequences[i]))
        for i, piece in zip(live, detok.step([streams[i] for i in live], final)):
            texts[i] += piece
    return texts


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_incremental_text_equals_the_whole_decode(kind, bpe):
    rng = random.Random(0)
    tokenizer = ByteTokenizer() if kind == "bytes" else bpe
    ids = tokenizer.encode(TEXT)
    # Slices cut anywhere: multi-byte characters split across tokens and steps, plus random ids.
    sequences = [ids[a:a + rng.randint(1, 60)] for a in (rng.randrange(len(ids)) for _ in range(20))]
    sequences += [[rng.randrange(256) for _ in range(30)] for _ in range(5)]
    texts = _incremental(tokenizer, sequences, rng)
    assert texts == tokenizer.decode_batch(sequences)


def test_incomplete_character_waits_for_its_next_byte():
    detok, s = Detokenizer(ByteTokenizer()), Stream()
    s.ids = list("é".encode())[:1]
    assert detok.step([s], [False]) == [""]
    s.ids += list("é".encode())[1:]
    assert detok.step([s], [False]) == ["é"]
    # An id past the bytes (a model with a larger vocabulary) or an invalid byte is text at once, not a wait:
    # a stream of them must not stall until the end.
    s.ids += [300]
    assert detok.step([s], [False]) == ["\ufffd"]
    s.ids += [0xFF]
    assert detok.step([s], [False]) == ["\ufffd"]


def test_stop_matcher():
    m = StopMatcher(["END", "\n\n"])
    assert m.find("abc EN", 4) is None and m.held("abc EN") == 2
    assert m.find("abc END more", 5) == 4  # completed by the new text, begun before it
    assert m.held("abc\n") == 1 and m.held("abc") == 0
    assert m.find("x\n\ny END", 0) == 1  # the earliest of several
    assert StopMatcher([]).find("anything", 0) is None and StopMatcher([""]).held("a") == 0


def test_default_chat_template_matches_transformers(bpe):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ours = render_chat(default_chat_template(), messages, bpe.eos_token, bpe.bos_token)
    theirs = bpe.tok.apply_chat_template(messages, chat_template=default_chat_template(), tokenize=False,
                                         add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<|user|>\nBye<|endoftext|>\n<|assistant|>\n")


def test_stream_decoder_prints_whole_characters_only(bpe):
    # `based generate` prints with it: a character split over tokens shows once complete, never as U+FFFD.
    for tokenizer in (ByteTokenizer(), bpe):
        ids = tokenizer.encode("naïve ünïcode → ok")
        push = tokenizer.decoder()
        pieces = [push([i]) for i in ids]
        assert "".join(pieces) == "naïve ünïcode → ok" and not any("\ufffd" in p for p in pieces)


def test_stop_matcher_held_is_not_quadratic_in_the_text():
    """Before: held() tried every tail up to the longest stop string's length, in Python, each step: 100k-character
    stop strings over a 50k-character text took 70 ms a call, on the engine's thread (a 3000-token stream with
    four such stops ran 12.6 s instead of 7.1)."""
    import random

    def brute(stops, text):  # what held() means: the longest tail (shorter than the longest stop) that begins one
        stops = [s for s in stops if s]
        longest = max(map(len, stops), default=0)
        return max([h for h in range(1, min(longest - 1, len(text)) + 1)
                    if any(s.startswith(text[-h:]) for s in stops)], default=0)

    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 80)))
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 3))]
        if text and rng.random() < 0.5:  # a stop string begun by a long tail
            stops.append(text[-rng.randint(1, len(text)):] + "".join(rng.choice("ab") for _ in range(rng.randint(0, 40))))
        assert StopMatcher(stops).held(text) == brute(stops, text), (stops, text)
    class Counted(str):  # counts the comparisons held() makes with it
        calls = 0

        def startswith(self, *args):
            Counted.calls += 1
            return super().startswith(*args)

    m = StopMatcher([Counted("x" * 100000), Counted("a" + "b" * 99999)])
    text = "ab" * 25000 + "y"
    assert m.held(text) == 0 and m.held(text[:-1]) == 2 and m.held("x" * 5000) == 5000
    Counted.calls = 0
    m.held(text)
    assert Counted.calls <= 2 * 32  # before: a comparison per tail length, 2 x 49,999
