import json

import pytest

from based.cli import main
from based.data.corpus import DataError
from based.data.tokenizer import (
    EOS,
    encode_batch,
    load_tokenizer,
    resolve_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)


def test_trained_bpe_loads_with_autotokenizer(small_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(small_tokenizer), local_files_only=True)
    assert len(tok) == 512
    assert tok.eos_token == EOS and tok.convert_tokens_to_ids(EOS) == tok.eos_token_id == 0
    text = "Return the number of items — naïve café ☕.\n\tTabs and  spaces stay."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # byte-level: lossless on any Unicode
    assert encode_batch(tok, [text, "x"]) == [ids, tok("x", add_special_tokens=False).input_ids]
    assert len(ids) < len(text.encode())  # merges learned


def test_vocab_too_small_and_unknown_folders(tmp_path):
    with pytest.raises(DataError, match="vocab size must be an int >= 257"):
        train_tokenizer(["some text"], 100, tmp_path / "t")
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer folder"):
        load_tokenizer(tmp_path / "empty")


def test_resolve_trains_once_and_caches(small_corpus, based_cache):
    first = resolve_tokenizer(None, small_corpus, train_vocab=300)
    cached = list((based_cache / "tokenizers").glob("bpe300-*"))
    assert len(cached) == 1 and len(first) == 300
    mtime = (cached[0] / "tokenizer.json").stat().st_mtime_ns
    again = resolve_tokenizer(None, small_corpus, train_vocab=300)
    assert (cached[0] / "tokenizer.json").stat().st_mtime_ns == mtime
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(first)
    assert tokenizer_fingerprint(resolve_tokenizer(None, small_corpus, train_vocab=320)) != tokenizer_fingerprint(first)


def test_cli_tokenizer_train(small_corpus, tmp_path, capsys):
    assert main(["tokenizer", "train", "--data", str(small_corpus), "--vocab-size", "400", "--out",
                 str(tmp_path / "tok")]) == 0
    assert "400-token byte-level BPE" in capsys.readouterr().out
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS
    assert len(load_tokenizer(tmp_path / "tok")) == 400
    with pytest.raises(SystemExit, match="error: corpus .* does not exist"):
        main(["tokenizer", "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "t2")])


def test_cli_tokenizer_train_bad_inputs_are_one_line_errors(small_corpus, tmp_path):
    args = ["tokenizer", "train", "--data", str(small_corpus)]
    with pytest.raises(SystemExit, match=r"^error: vocab size 1,000,000,000 is over the bound of 1,048,576 tokens"):
        main([*args, "--vocab-size", "1000000000", "--out", str(tmp_path / "t")])  # Rust aborted (exit 134)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"^error: --out .*file is an existing file, not a folder"):
        main([*args, "--out", str(tmp_path / "file")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"^error: --out .*mine is a folder holding other files"):
        main([*args, "--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"  # was deleted before
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(SystemExit, match=r"^error: .*blob.bin: 8,256 of 16,384 bytes .* are not UTF-8 text"):
        main(["tokenizer", "train", "--data", str(tmp_path / "blob.bin"), "--out", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()


def test_cli_tokenizer_train_out_under_a_file_fails_before_training(small_corpus, tmp_path, monkeypatch):
    # Before: NotADirectoryError's traceback, raised when the trained tokenizer was written.
    from tokenizers import Tokenizer

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(Tokenizer, "train_from_iterator", no_training)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"^error: --out .*file/sub is under .*file, which is a file, not a folder"):
        main(["tokenizer", "train", "--data", str(small_corpus), "--out", str(tmp_path / "file" / "sub")])
    assert (tmp_path / "file").read_text() == "x"


def test_trained_tokenizer_pads_with_eos(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    assert tok.pad_token == EOS and tok.pad_token_id == tok.eos_token_id
    batch = tok(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2 and (batch.attention_mask == 0).any()


def test_trained_tokenizer_pads_on_the_left(small_tokenizer):
    # Prompts of a batch must end together for generation (prefill refuses right padding).
    batch = load_tokenizer(small_tokenizer)(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[0, -1] == 1


def test_a_folder_without_tokenizer_files_is_one_line(tmp_path):
    # Before: transformers' five-line "Couldn't instantiate the backend tokenizer ... You need to have
    # sentencepiece or tiktoken installed" for `based train --tokenizer DIR` on a folder of text files.
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(DataError) as error:
        load_tokenizer(tmp_path)
    assert "\n" not in str(error.value)
    assert "holds none of tokenizer.json, tokenizer_config.json" in str(error.value)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer folder") as error:
        load_tokenizer(tmp_path)
    assert "\n" not in str(error.value)
