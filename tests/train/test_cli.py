"""The README's main command on the built-in corpus, shortened: train, then generate from the result."""
import json

import pytest

from based.cli import main


def test_default_corpus_run_then_generate(tmp_path, based_cache, capsys):
    out = tmp_path / "debug"
    assert main(["train", "--preset", "debug", "--out", str(out), "--max-steps", "3", "--seq-len", "64",
                 "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "greedy sample: 'The" in printed
    assert list((based_cache / "corpora").glob("python-*-stdlib-docs.jsonl"))
    assert list((based_cache / "tokenizers").glob("bpe4096-*"))  # trained once for the default corpus
    run = json.loads((out / "run.json").read_text())
    assert (run["preset"], run["data"], run["tokenizer"]) == ("debug", None, None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and rows[-1]["step"] == 3 and "val_loss" in rows[-1]
    pytest.importorskip("based.commands.generate")
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Return the", "--max-new-tokens", "4",
                 "--temperature", "0", "--no-stream"]) == 0
    assert "Return the" in capsys.readouterr().out
