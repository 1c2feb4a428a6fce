"""Shared fixtures: a per-session BASED_CACHE, a small real-English corpus and a BPE trained on it."""
import json

import pytest


@pytest.fixture(scope="session", autouse=True)
def based_cache(tmp_path_factory):
    """Every test of the session caches corpora, tokenizers and tokenized data here, never in ~/.cache."""
    path = tmp_path_factory.getbasetemp() / "based-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("BASED_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """JSONL of the first 40 language-reference topics of pydoc_data (about 200 KB of English)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.getbasetemp() / "small-corpus" / "topics.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:40]))
    return path


@pytest.fixture(scope="session")
def small_tokenizer(small_corpus, tmp_path_factory):
    """A 512-token byte-level BPE trained on small_corpus (folder path)."""
    from based.data.corpus import iter_documents
    from based.data.tokenizer import train_tokenizer

    out = tmp_path_factory.getbasetemp() / "small-tokenizer"
    if not (out / "tokenizer.json").exists():
        train_tokenizer(iter_documents(small_corpus), 512, out)
    return out
