"""Multi-query associative recall (MQAR; Arora et al., 2023, Zoology), the recall task of the BASED paper.

An example of length T with n key-value pairs over a vocabulary of V tokens:

    k_1 v_1 k_2 v_2 ... k_n v_n | x x k_3 x x x k_1 x ... (queries of the keys, filler x between)

Keys come from [1, V/2), values from [V/2, V), neither repeats within an example. Query j sits at
position 2n + 2 * gap_j, the gaps drawn without replacement from [0, (T - 2n) // 2) with weight
(gap + 1)^(a - 1): most queries come soon after the pairs, a few far away. The label of a query position
is its key's value (the next token a model must predict there); every other label is -100.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _distinct_uniform(num_rows: int, size: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """[num_rows, size] tokens from [low, high), distinct within a row, uniform over ordered draws.

    Draws with replacement and redraws every repeat of an earlier entry until no row repeats: O(N n log n)
    instead of the O(N (high - low)) of a weighted draw. The result is uniform because the procedure
    treats all tokens alike, and only the uniform law on distinct tuples is invariant under relabelling.
    """
    x = torch.randint(low, high, (num_rows, size), generator=generator)
    while True:
        sorted_x, order = x.sort(dim=1, stable=True)  # stable: the earliest of equal entries comes first
        repeat = torch.zeros_like(x, dtype=torch.bool)
        repeat.scatter_(1, order[:, 1:], sorted_x[:, 1:] == sorted_x[:, :-1])
        count = int(repeat.sum())
        if count == 0:
            return x
        x[repeat] = torch.randint(low, high, (count,), generator=generator)


def generate_mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR examples under the Zoology rules.

    Args:
        num_examples: N.
        seq_len: T, tokens per example (4 * num_kv_pairs <= T < vocab_size).
        num_kv_pairs: n, key-value pairs (and queries) per example.
        vocab_size: V; keys in [1, V/2), values in [V/2, V).
        power_a: a in the query-gap weight (gap + 1)^(a - 1); small a puts queries close to the pairs.
        random_non_queries: fill the non-query positions after the pairs with uniform tokens from
            [0, V) (Zoology's default) instead of 0.
        seed: the same seed gives the same examples.
    Returns:
        inputs [N, T] and labels [N, T] (long); labels[i, t] is the token to predict at position t, the
        value of the key inputs[i, t] at query positions and -100 everywhere else.
    """
    for name, value in (("num_examples", num_examples), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"4 * num_kv_pairs = {4 * num_kv_pairs} > seq_len = {seq_len}: the pairs take 2n tokens and the "
            f"n queries need 2n more (one every other position)"
        )
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size = {vocab_size} must be greater than seq_len = {seq_len} (Zoology's rule)")
    if power_a <= 0:
        raise ValueError(f"power_a must be positive, got {power_a}")
    N, T, n = num_examples, seq_len, num_kv_pairs
    g = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    keys = _distinct_uniform(N, n, 1, half, g)  # [N, n]
    values = _distinct_uniform(N, n, half, vocab_size, g)  # [N, n]
    context = 2 * n
    space = (T - context) // 2
    gap_weights = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    # Successive weighted draws without replacement, as numpy's choice(replace=False, p=...) in Zoology.
    gaps = torch.multinomial(gap_weights.expand(N, -1), n, generator=g)  # [N, n], distinct per row
    query_pos = context + 2 * gaps

    inputs = torch.zeros(N, T, dtype=torch.long)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    inputs.scatter_(1, query_pos, keys)
    labels = torch.full((N, T), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, query_pos, values)
    if random_non_queries:
        filler = torch.randint(vocab_size, (N, T), generator=g)
        is_filler = labels == IGNORE_INDEX
        is_filler[:, :context] = False
        inputs = torch.where(is_filler, filler, inputs)
    return inputs, labels
