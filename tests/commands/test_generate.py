"""`based generate`: streams on the debug preset, --no-stream prints the same text, checkpoints and their
tokenizers load from disk, bad input exits with a message."""
import sys

import pytest
import torch

import based.commands.generate as command
from based import BasedConfig, BasedForCausalLM
from based.cli import main


def run(capsys, monkeypatch, *args):
    """Exit code, stdout, stderr, and the stdout length seen as each block of tokens was produced."""
    seen = []

    def watched(*a, **k):
        for block in command_stream(*a, **k):
            seen.append(len(sys.stdout.getvalue()))
            yield block

    command_stream = __import__("based.generation", fromlist=["stream"]).stream
    monkeypatch.setattr("based.generation.stream", watched)
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err, seen


def test_streams_on_the_debug_preset(capsys, monkeypatch):
    code, out, err, seen = run(capsys, monkeypatch, "--preset", "debug", "--prompt", "Hello", "--max-new-tokens", "12")
    assert code == 0 and out.startswith("Hello") and "12 new tokens x 1" in err
    assert len(seen) == 12 and seen[-1] > seen[1] > len("Hello")  # text appears while generating
    code, quiet, _, seen = run(capsys, monkeypatch, "--preset", "debug", "--prompt", "Hello", "--max-new-tokens", "12",
                               "--no-stream")
    assert code == 0 and quiet == out and set(seen) == {0}  # same text (same seed), printed at the end


def test_sampling_flags_and_batch(capsys, monkeypatch):
    args = ["--preset", "debug", "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0.7", "--top-k", "20",
            "--top-p", "0.9", "--batch-size", "3", "--seed", "4"]
    code, out, _, _ = run(capsys, monkeypatch, *args)
    assert code == 0 and out.count("--- sample") == 3
    assert run(capsys, monkeypatch, *args)[1] == out  # seeded


def test_checkpoint_with_and_without_tokenizer(tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    BasedForCausalLM(BasedConfig.from_preset("debug")).save_pretrained(tmp_path)
    code, out, err, _ = run(capsys, monkeypatch, "--checkpoint", str(tmp_path), "--prompt", "hi",
                            "--max-new-tokens", "4")
    assert code == 0 and "ByteTokenizer" in err and out.startswith("hi")
    words = ["[UNK]", "</s>"] + [f"w{i}" for i in range(254)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path)
    code, out, err, _ = run(capsys, monkeypatch, "--checkpoint", str(tmp_path), "--prompt", "w1 w2", "--max-new-tokens",
                            "5", "--temperature", "0")
    assert code == 0 and "HFTokenizer" in err and out.startswith("w1 w2")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "x", "--max-new-tokens", "-1"], "max_new_tokens must be an int >= 0"),
        # Before: accepted, and a state model generated on without end.
        (["--prompt", "x", "--max-new-tokens", str(10**12)], "max_new_tokens must be at most 2**31 - 1"),
        (["--prompt", "x", "--top-p", "0"], r"top_p must be in (0, 1]"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", "x", "--batch-size", "100000000"], "lower the batch size (--batch-size)"),
        # Before: "Overflow when unpacking long long", naming no flag.
        (["--prompt", "x", "--seed", str(2**70)], "--seed must fit in 64 bits (-2**63 .. 2**64 - 1), got"),
    ],
)
def test_bad_input_exits_with_a_message(args, message, capsys, monkeypatch):
    code, out, err, _ = run(capsys, monkeypatch, "--preset", "debug", *args)
    assert code == 2 and message in err and out == ""


def test_positional_limit_and_missing_checkpoint(tmp_path, capsys, monkeypatch):
    code, _, err, _ = run(capsys, monkeypatch, "--preset", "transformer-debug", "--prompt", "x" * 600)
    assert code == 2 and "max_position_embeddings=512" in err
    code, _, err, _ = run(capsys, monkeypatch, "--checkpoint", str(tmp_path), "--prompt", "x")
    assert code == 2 and "has no config.json" in err


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-300, 1e-6])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature):
    # Before the fix logits / T overflowed to inf, softmax gave NaN and every row drew token 0.
    from based.generation import SamplingParams, sample

    torch.manual_seed(0)
    logits = torch.randn(8, 300) * 5
    params = SamplingParams(temperature)
    assert not params.greedy
    assert torch.equal(sample(logits, params), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature, top_k=5, top_p=0.5)), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [100.0, 1e6, 1e300])
def test_a_huge_temperature_samples_every_token(temperature):
    from based.generation import SamplingParams, sample

    torch.manual_seed(0)
    logits = torch.randn(1, 16).expand(4000, -1) * 5
    ids = sample(logits, SamplingParams(temperature))
    counts = torch.bincount(ids, minlength=16)
    assert counts.sum() == 4000 and counts.min() > 150  # about uniform: 250 each


def test_tiny_temperature_on_the_command_line_is_greedy(capsys, monkeypatch):
    args = ["--preset", "debug", "--prompt", "Return the", "--max-new-tokens", "8"]
    code, greedy, _, _ = run(capsys, monkeypatch, *args, "--temperature", "0")
    assert code == 0
    for t in ("1e-300", "1e-39", "1e-45"):
        code, out, err, _ = run(capsys, monkeypatch, *args, "--temperature", t)
        assert (code, out) == (0, greedy), err


def test_infinite_temperature_is_refused(capsys, monkeypatch):
    code, out, err, _ = run(capsys, monkeypatch, "--preset", "debug", "--prompt", "x", "--temperature", "inf")
    assert code == 2 and "temperature must be finite" in err and out == ""
