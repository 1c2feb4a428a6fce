import numpy as np
import pytest
import torch

import based.data.packed as packed_mod
from based.data.corpus import DataError, iter_documents
from based.data.packed import WindowSampler, check_splits, num_windows, pack_corpus, windows
from based.data.tokenizer import encode_batch, load_tokenizer


@pytest.fixture(scope="module")
def tok(small_tokenizer):
    return load_tokenizer(small_tokenizer)


def test_pack_layout_and_split(small_corpus, tok, tmp_path):
    p = pack_corpus(small_corpus, tok, val_fraction=0.05, root=tmp_path, progress=False)
    expected = []
    for ids in encode_batch(tok, list(iter_documents(small_corpus))):
        expected += ids + [tok.eos_token_id]
    tokens = np.concatenate([p.train, p.val])
    assert p.train.dtype == np.uint16 and tokens.tolist() == expected
    assert p.meta["documents"] == 40 and p.meta["tokens"] == len(expected)
    assert len(p.val) == round(0.05 * len(expected))  # the tail is validation


def test_reused_when_unchanged_redone_when_changed(tmp_path, tok, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    first = pack_corpus(corpus, tok, root=tmp_path / "cache", progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(packed_mod, "_tokenize", fail)
    assert pack_corpus(corpus, tok, root=tmp_path / "cache", progress=False).path == first.path
    (corpus / "b.txt").write_text("A new document.")
    with pytest.raises(AssertionError, match="tokenized again"):
        pack_corpus(corpus, tok, root=tmp_path / "cache", progress=False)


def test_too_small_for_one_sequence(tmp_path, tok):
    (tmp_path / "tiny.txt").write_text("Hello world.")
    p = pack_corpus(tmp_path / "tiny.txt", tok, root=tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match=r"fewer than one sequence of seq_len \+ 1 = 257"):
        check_splits(p, 256)


def test_windows_shift_by_one():
    tokens = np.arange(100, dtype=np.uint16)
    assert num_windows(tokens, 10) == 9
    x, y = windows(tokens, [0, 3], 10)
    assert x.dtype == torch.int64 and x.tolist() == [list(range(0, 10)), list(range(30, 40))]
    assert torch.equal(y, x + 1)


def test_sampler_epochs_are_seeded_permutations():
    tokens = np.arange(1001, dtype=np.uint16)
    s = WindowSampler(tokens, 10, seed=3)
    first, second = [s.window(g) for g in range(100)], [s.window(g) for g in range(100, 200)]
    assert sorted(first) == sorted(second) == list(range(100)) and first != second
    assert [WindowSampler(tokens, 10, seed=3).window(g) for g in range(150, 160)] == second[50:60]  # random access
    assert [WindowSampler(tokens, 10, seed=4).window(g) for g in range(100)] != first
    x, y = s.batch(5, 3)
    assert x.shape == (3, 10) and x[:, 0].tolist() == [10 * w for w in first[5:8]]


def test_a_split_too_small_gets_the_val_fraction_advice_that_grows_it(tmp_path, tok):
    # Before: a training split emptied by --val-fraction 0.9999 was told to use "a larger --val-fraction".
    (tmp_path / "c.txt").write_text("A short document about the number of items in a container. " * 40)
    for fraction, split, advice in ((0.999, "training", "smaller"), (0.001, "validation", "larger")):
        p = pack_corpus(tmp_path / "c.txt", tok, val_fraction=fraction, root=tmp_path / "cache", progress=False)
        with pytest.raises(DataError, match=rf"^the {split} split .* or a {advice} --val-fraction$"):
            check_splits(p, 64)
