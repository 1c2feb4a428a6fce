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


def _garbage_parquet(path):
    path.write_text("hello world, this is text and not Parquet\n")


def _empty(path):
    path.write_bytes(b"")


def _int_column_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), path)


def _truncated_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["some text " * 50] * 50}), path)
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("name, write, match", [
    # Before: pyarrow's ArrowInvalid traceback.
    ("garbage.parquet", _garbage_parquet, "garbage.parquet is not a readable Parquet file (Parquet magic bytes"),
    ("empty.parquet", _empty, "empty.parquet is not a readable Parquet file (Parquet file size is 0 bytes)"),
    ("cut.parquet", _truncated_parquet, "cut.parquet is not a readable Parquet file"),
    # Before: AttributeError: 'int' object has no attribute 'strip'.
    ("ints.parquet", _int_column_parquet, "ints.parquet: column 'text' holds int64, not text: set --text-field"),
    # Before: both were trained on as plain text, braces and keys included, with exit 0.
    ("pretty.json", lambda p: p.write_text('{\n  "text": "a document"\n}\n'),
     'pretty.json:1 is not valid JSON (Expecting property name enclosed in double quotes): a .jsonl/.json corpus '
     'holds one JSON object a line'),
    ("array.json", lambda p: p.write_text('[{"text": "one"}, {"text": "two"}]\n'),
     "array.json:1 is a JSON list, not an object"),
])
def test_cli_tokenizer_train_refuses_a_file_not_in_its_suffix_format(tmp_path, name, write, match):
    write(tmp_path / name)
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--data", str(tmp_path / name), "--vocab-size", "300",
              "--out", str(tmp_path / "t")])
    message = str(e.value.code)
    assert message.startswith("error: ") and match in message and "\n" not in message, message
    assert not (tmp_path / "t").exists()


def test_a_json_file_is_read_as_json_lines(tmp_path):
    # Hugging Face datasets' to_json writes JSON lines to a .json file: the documents are the text fields.
    from based.data.corpus import corpus_fingerprint, iter_documents

    (tmp_path / "rows.json").write_text('{"text": "first document"}\n\n{"text": "second", "id": 2}\n')
    assert list(iter_documents(tmp_path / "rows.json")) == ["first document", "second"]
    # The same bytes as a .jsonl are another corpus to the caches (a .json was once read as plain text).
    (tmp_path / "rows.jsonl").write_bytes((tmp_path / "rows.json").read_bytes())
    assert corpus_fingerprint(tmp_path / "rows.json") != corpus_fingerprint(tmp_path / "rows.jsonl")
    assert main(["tokenizer", "train", "--data", str(tmp_path / "rows.json"), "--vocab-size", "300", "--out",
                 str(tmp_path / "t")]) == 0


def test_cli_tokenizer_train_refuses_damaged_datasets_folders_and_special_files(tmp_path):
    # Before: FileNotFoundError's traceback from datasets; /dev/null was called a "corpus folder".
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("garbage")
    for data, match in [(tmp_path / "ds", "ds looks like a Hugging Face datasets folder but does not load"),
                        ("/dev/null", "corpus /dev/null is neither a regular file nor a folder")]:
        with pytest.raises(SystemExit) as e:
            main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "t")])
        assert match in str(e.value.code) and "\n" not in str(e.value.code), e.value.code


@pytest.mark.parametrize("name, content, match", [
    ("tokenizer.json", "garbage", "tokenizer.json is not a tokenizer file: it is not valid JSON (Expecting value"),
    ("tokenizer.json", "", "tokenizer.json is not a tokenizer file: it is empty"),
    # Before: KeyError 'added_tokens' / tokenizers' "Model missing" with no file named.
    ("tokenizer.json", "{}", 'tokenizer.json is not a tokenizer file: it has no "model" object'),
    ("tokenizer_config.json", "[1]", "tokenizer_config.json is not a tokenizer file: it holds a JSON list"),
    ("tokenizer.json", None, "tokenizer.json is a folder, not a tokenizer file"),
])
def test_a_damaged_tokenizer_file_is_named(small_tokenizer, tmp_path, name, content, match):
    import shutil

    shutil.copytree(small_tokenizer, tmp_path / "tok")
    (tmp_path / "tok" / name).unlink()
    if content is None:
        (tmp_path / "tok" / name).mkdir()
    else:
        (tmp_path / "tok" / name).write_text(content)
    with pytest.raises(DataError) as error:
        load_tokenizer(tmp_path / "tok")
    assert match in str(error.value) and str(tmp_path / "tok" / name) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_tokenizer_file_given_for_its_folder_is_named(small_tokenizer):
    # Before: "tokenizer folder .../tokenizer.json does not exist".
    with pytest.raises(DataError, match=r"tokenizer .*/tokenizer.json is a file: pass the folder that holds it"):
        load_tokenizer(small_tokenizer / "tokenizer.json")
