import json
import sys

import pytest

from based.data.corpus import (
    DataError,
    cache_dir,
    corpus_files,
    corpus_fingerprint,
    default_corpus,
    iter_documents,
    resolve_corpus,
)


def test_cache_dir_follows_env(based_cache):
    assert cache_dir() == based_cache


def test_default_corpus_is_the_stdlib_documentation(based_cache):
    path = default_corpus()
    assert path.parent == based_cache / "corpora" and path.suffix == ".jsonl"
    mtime = path.stat().st_mtime_ns
    assert default_corpus() == path and path.stat().st_mtime_ns == mtime  # collected once, then reused
    docs = list(iter_documents(path))
    # CPython 3.11.7: 6,288 documents, 2.11 M characters (docs/training.md); other versions differ a little.
    assert 4000 < len(docs) < 10000
    assert 1.5e6 < sum(map(len, docs)) < 4e6
    assert all(len(d.split()) >= 8 for d in docs)
    assert len(set(docs)) == len(docs)
    from pydoc_data.topics import topics

    assert topics["if"].strip() in docs  # the language reference
    assert json.dumps.__doc__.strip().split("\n")[0] in "\n".join(docs)  # a function docstring


def test_text_folder_sorted_hidden_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("second document")
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "blank.txt").write_text("  \n")
    assert [p.name for p in corpus_files(tmp_path)] == ["a.txt", "two.md", "blank.txt"]  # path order: b/ < blank
    assert list(iter_documents(tmp_path)) == ["first document", "second document"]


def test_a_file_named_directly_is_text_whatever_its_suffix(tmp_path):
    f = tmp_path / "corpus.data"
    f.write_text("some text")
    assert list(iter_documents(f)) == ["some text"]


def test_jsonl_with_a_text_field(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"content": "one"}) + "\n\n" + json.dumps({"content": "two", "id": 3}) + "\n")
    assert list(iter_documents(f, "content")) == ["one", "two"]
    with pytest.raises(DataError, match=r"c.jsonl:1 has no string field 'text'.*--text-field"):
        list(iter_documents(f))
    f.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"c.jsonl:2 is not valid JSON"):
        list(iter_documents(f))


def test_non_utf8_bytes_are_counted_warned_and_refused_past_one_percent(tmp_path, capsys):
    text = "Return the number of items in the container. " * 100  # 4,600 bytes
    f = tmp_path / "latin1.txt"
    f.write_bytes(text.encode() + "café".encode("latin-1") + b"\xff")  # 2 of 4,505 bytes not UTF-8
    [doc] = iter_documents(f)
    assert doc == text + "caf\ufffd\ufffd"
    assert f"warning: {f}: 2 of 4,505 bytes (0.04%) are not UTF-8 text" in capsys.readouterr().err
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 8)  # half invalid UTF-8, the rest mostly control bytes and NUL
    with pytest.raises(DataError, match=rf"{binary}: 1,032 of 2,048 bytes \(50.39%\) are not UTF-8 text \(a binary "
                                        r"file, or text in another encoding\): convert it to UTF-8"):
        list(iter_documents(binary))
    rows = tmp_path / "latin1.jsonl"
    rows.write_bytes(json.dumps({"text": "naïve café " * 20}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=rf"{rows}: 40 of .* bytes .* are not UTF-8 text"):
        list(iter_documents(rows))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "naïve café ☕"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(iter_documents(good)) == ["naïve café ☕"] and "warning" not in capsys.readouterr().err


def test_missing_and_empty_corpora(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_corpus(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no .txt"):
        corpus_files(tmp_path)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="holds no text"):
        list(iter_documents(tmp_path))


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    f = tmp_path / "c.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="needs pyarrow: pip install pyarrow"):
        list(iter_documents(f))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha", None, "beta"]}), tmp_path / "c.parquet")
    assert list(iter_documents(tmp_path / "c.parquet", "body")) == ["alpha", "beta"]
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(tmp_path / "c.parquet"))


def test_hf_dataset_folder_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="save_to_disk.*needs datasets: pip install datasets"):
        list(iter_documents(tmp_path))


def test_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(tmp_path / "ds")) == ["alpha", "beta"]


def test_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    first = corpus_fingerprint(tmp_path)
    assert corpus_fingerprint(tmp_path) == first
    f.write_text("hello, world")
    assert corpus_fingerprint(tmp_path) != first
    (tmp_path / "b.txt").write_text("more")
    assert len({first, corpus_fingerprint(tmp_path), corpus_fingerprint(tmp_path, "body")}) == 3
