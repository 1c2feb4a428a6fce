"""argmax_rows (greedy decoding's token choice): the Triton kernel against torch.argmax. Without CUDA the
kernel runs under TRITON_INTERPRET=1 on small rows."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from based.ops.argmax import argmax_rows  # noqa: E402

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("split", [False, True])  # one program per row, or a row over programs (few rows)
@pytest.mark.parametrize("N", [7, 2048, 5000])  # under, exactly and over one block (and chunk) of columns
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_with_ties_and_strided_rows(N, dtype, split):
    from based.ops.argmax.triton import triton_argmax_rows

    torch.manual_seed(0)
    padded = torch.randint(-3, 4, (5, N + 40), device=DEVICE).to(dtype)  # few values: many ties
    padded[:, N:] = 100  # padding columns past the vocabulary must not count
    logits = padded[:, :N]  # rows strided like the LM head's sliced output
    assert torch.equal(triton_argmax_rows(logits, split=split), logits.argmax(-1))
    assert torch.equal(argmax_rows(logits, backend="triton"), logits.argmax(-1))
    assert torch.equal(argmax_rows(logits, backend="torch"), logits.argmax(-1))


@pytest.mark.parametrize("split", [False, True])
def test_edge_rows(split):
    from based.ops.argmax.triton import SPLIT_CHUNK, triton_argmax_rows

    rows = torch.full((4, SPLIT_CHUNK + 300), float("-inf"), device=DEVICE)
    rows[1, 17] = float("nan")  # NaN is the largest value, as for torch.argmax
    rows[1, 250] = 5.0
    rows[2, -1] = 1.0  # the last column
    rows[3, [5, SPLIT_CHUNK + 5]] = 2.0  # a tie across chunks: the first wins
    expected = [0, 17, SPLIT_CHUNK + 299, 5]
    assert triton_argmax_rows(rows, split=split).tolist() == expected
    assert rows.argmax(-1).tolist() == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\]"):
        argmax_rows(torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be"):
        argmax_rows(torch.zeros(2, 3), backend="cuda")


def test_auto_takes_torch_for_few_rows_or_the_cpu():
    logits = torch.randn(4, 10)
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))
