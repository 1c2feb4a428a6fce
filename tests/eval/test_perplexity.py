"""Perplexity: windows score every token once; the result equals a direct computation; corpus formats;
`based eval --task perplexity` and its errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from based import BasedConfig, BasedForCausalLM
from based.cli import main
from based.eval import evaluate_perplexity
from based.eval.perplexity import windows

DOCS = [
    "The capital of France is Paris. The capital of Italy is Rome. " * 6,
    "Name: Alice. Phone: 555-0100.",
    "x",  # with the EOS prefix, two tokens: still scored
]


@pytest.mark.parametrize("n, L, stride", [(1, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (8, 8, 4), (100, 16, 16)])
def test_windows_score_every_position_once_with_enough_context(n, L, stride):
    scored = []
    for b, e, s in windows(n, L, stride):
        assert 0 <= b < e <= n and e - b <= L and 1 <= s <= e - b
        if b > 0:  # after the first window, each scored position sees at least L - stride earlier ones
            assert e - s - b >= L - stride
        scored += range(e - s, e)
    assert scored == list(range(n))


def test_windows_reject_bad_arguments():
    for L, stride in [(4, 0), (4, 5), (0, 1)]:
        with pytest.raises(ValueError, match="stride"):
            windows(10, L, stride)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return BasedForCausalLM(BasedConfig.from_preset("debug", vocab_size=len(tokenizer))).eval()


def doc_ids(tokenizer, text):
    return torch.tensor([tokenizer.eos_token_id] + tokenizer(text)["input_ids"])


def test_short_documents_match_the_plain_forward(model, tokenizer):
    report = evaluate_perplexity(model, tokenizer, DOCS, max_length=512, progress=False)
    nll, count, n_bytes = 0.0, 0, 0
    for text in DOCS:
        ids = doc_ids(tokenizer, text)
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
        nll += F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()
        count += len(ids) - 1
        n_bytes += len(text.encode())
    assert report["documents"] == 3 and report["tokens"] == count
    assert report["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_windows_match_a_window_by_window_computation(model, tokenizer, batch_size):
    L, stride = 24, 10
    report = evaluate_perplexity(model, tokenizer, DOCS, max_length=L, stride=stride, batch_size=batch_size,
                                 progress=False)
    nll, count = 0.0, 0
    for text in DOCS:
        ids = doc_ids(tokenizer, text)
        for b, e, s in windows(len(ids) - 1, L, stride):
            with torch.no_grad():
                logits = model(ids[None, b:e]).logits[0]
            nll += F.cross_entropy(logits[-s:].double(), ids[e - s + 1 : e + 1], reduction="sum").item()
            count += s
    assert len(doc_ids(tokenizer, DOCS[0])) > 3 * L  # the long document really slides
    assert report["tokens"] == count
    assert report["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_cli_perplexity_report(checkpoint, tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "perplexity", "--data", str(data),
                 "--out", str(out), "--max-length", "32", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "perplexity.json").read_text())
    assert report["task"] == "perplexity" and report["documents"] == 3 and report["stride"] == 16
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    # A random model predicts close to uniformly over its vocabulary.
    assert abs(report["loss"] - math.log(len_vocab(checkpoint))) < 1.0


def len_vocab(checkpoint):
    return json.loads((checkpoint / "config.json").read_text())["vocab_size"]


def test_cli_errors(checkpoint, tmp_path, capsys):
    def run(*argv):
        return main(["eval", "--no-progress", *argv])

    with pytest.raises(SystemExit, match="corpus .*none.txt does not exist"):
        run("--checkpoint", str(checkpoint), "--task", "perplexity", "--data", str(tmp_path / "none.txt"))
    (tmp_path / "c.txt").write_text("some text")
    with pytest.raises(SystemExit, match="checkpoint directory not found"):
        run("--checkpoint", str(tmp_path / "nockpt"), "--task", "perplexity", "--data", str(tmp_path / "c.txt"))
    (tmp_path / "weights_only").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "weights_only" / f).write_bytes((checkpoint / f).read_bytes())
    with pytest.raises(SystemExit, match="no usable tokenizer.*--tokenizer"):
        run("--checkpoint", str(tmp_path / "weights_only"), "--task", "perplexity", "--data", str(tmp_path / "c.txt"))
    with pytest.raises(SystemExit) as e:
        run("--checkpoint", str(checkpoint), "--task", "hellaswag", "--data", str(tmp_path / "c.txt"))
    assert e.value.code == 2 and "invalid choice: 'hellaswag'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2 has no string field 'text'"):
        run("--checkpoint", str(checkpoint), "--task", "perplexity", "--data", str(bad))
    with pytest.raises(SystemExit, match="--stride must be positive"):
        run("--checkpoint", str(checkpoint), "--task", "perplexity", "--data", str(tmp_path / "c.txt"), "--stride", "0")


def test_windows_past_a_full_attention_models_positions_are_refused(tokenizer, tmp_path, capsys):
    # Before: --max-length 4096 on a transformer checkpoint of 512 positions scored windows past them (exit 0);
    # the default window is now the model's limit where that is below 2048.
    torch.manual_seed(0)
    config = BasedConfig.from_preset("transformer-debug", vocab_size=len(tokenizer), max_position_embeddings=24)
    model = BasedForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"max_length=32 exceeds this model's max_position_embeddings=24 .*"
                                         r"lower --max-length to at most 24"):
        evaluate_perplexity(model, tokenizer, DOCS, max_length=32, progress=False)
    assert evaluate_perplexity(model, tokenizer, DOCS, max_length=24, progress=False)["max_length"] == 24
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    args = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--task", "perplexity", "--data", str(data),
            "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit, match="^based eval: max_length=4096 exceeds"):
        main([*args, "--max-length", "4096"])
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["max_length"] == 24
