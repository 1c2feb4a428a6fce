"""MQAR generator: the Zoology rules as properties over several seeds and sizes."""
import pytest
import torch

from based.data.mqar import IGNORE_INDEX, generate_mqar

SIZES = [  # (num_examples, seq_len, num_kv_pairs, vocab_size)
    (50, 64, 4, 8192), (40, 64, 16, 128), (30, 128, 32, 256), (20, 33, 8, 40), (25, 256, 64, 300), (10, 8, 2, 9),
]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("N, T, n, V", SIZES)
def test_rules(N, T, n, V, seed):
    inputs, labels = generate_mqar(N, T, n, vocab_size=V, seed=seed)
    assert inputs.shape == labels.shape == (N, T) and inputs.dtype == labels.dtype == torch.long
    assert inputs.min() >= 0 and inputs.max() < V
    keys, values = inputs[:, 0 : 2 * n : 2], inputs[:, 1 : 2 * n : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row in range(N):
        assert len(set(keys[row].tolist())) == n and len(set(values[row].tolist())) == n  # no repeats
        query_pos = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert len(query_pos) == n  # one query per key
        assert (query_pos >= 2 * n).all() and ((query_pos - 2 * n) % 2 == 0).all()
        value_of = dict(zip(keys[row].tolist(), values[row].tolist()))
        queried = inputs[row, query_pos].tolist()
        assert sorted(queried) == sorted(value_of)  # every key asked exactly once
        # Next-token aligned: the label at a query position is the value to predict there.
        assert labels[row, query_pos].tolist() == [value_of[k] for k in queried]
    assert (labels[:, : 2 * n] == IGNORE_INDEX).all()


def test_deterministic_per_seed():
    a, b, c = (generate_mqar(64, 64, 8, 512, seed=s) for s in (3, 3, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_filler_tokens():
    inputs, labels = generate_mqar(200, 64, 4, 256, random_non_queries=False, seed=0)
    filler = labels == IGNORE_INDEX
    filler[:, :8] = False
    assert (inputs[filler] == 0).all()
    inputs, labels = generate_mqar(200, 64, 4, 256, seed=0)
    assert len(inputs[filler].unique()) > 200  # random tokens from the whole vocabulary


def test_query_gaps_follow_the_power_law():
    # One pair: the query's gap g in [0, space) must have probability (g + 1)^(a - 1) / sum.
    a, T, N = 0.3, 64, 20_000
    _, labels = generate_mqar(N, T, 1, 128, power_a=a, seed=0)
    gaps = ((labels != IGNORE_INDEX).nonzero()[:, 1] - 2) // 2
    space = (T - 2) // 2
    weights = torch.arange(1, space + 1, dtype=torch.float64) ** (a - 1)
    expected = weights / weights.sum()
    observed = torch.bincount(gaps, minlength=space).double() / N
    assert (observed - expected).abs().max() < 0.012  # > 4 sigma at N = 20k
    # The default a = 0.01 puts most queries right after the pairs.
    _, labels = generate_mqar(2000, 64, 4, 256, seed=0)
    gaps = ((labels != IGNORE_INDEX).nonzero()[:, 1] - 8) // 2
    assert (gaps < 8).float().mean() > 0.5


def test_keys_uniform_over_ordered_distinct_pairs():
    # V = 9: keys from {1, 2, 3}; two distinct keys in order: 6 outcomes, each 1/6.
    inputs, _ = generate_mqar(12_000, 8, 2, vocab_size=9, seed=0)
    pairs = inputs[:, 0] * 10 + inputs[:, 2]
    counts = torch.bincount(pairs)[pairs.unique()]
    assert len(counts) == 6
    assert (counts.double() / len(pairs) - 1 / 6).abs().max() < 0.015  # > 4 sigma at N = 12k


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 64, 17), r"4 \* num_kv_pairs = 68 > seq_len = 64"),
        ((10, 64, 4, 64), "vocab_size = 64 must be greater than seq_len = 64"),
        ((0, 64, 4), "num_examples must be a positive int, got 0"),
        ((10, 64, 0), "num_kv_pairs must be a positive int, got 0"),
        ((10, 64, 4, 8192, 0.0), "power_a must be positive"),
    ],
)
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        generate_mqar(*args)
