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


@pytest.mark.parametrize("N", [7, 2048, 5000])  # under, exactly and over one block of columns
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_with_ties_and_strided_rows(N, dtype):
    torch.manual_seed(0)
    padded = torch.randint(-3, 4, (5, N + 40), device=DEVICE).to(dtype)  # few values: many ties
    padded[:, N:] = 100  # padding columns past the vocabulary must not count
    logits = padded[:, :N]  # rows strided like the LM head's sliced output
    assert torch.equal(argmax_rows(logits, backend="triton"), logits.argmax(-1))
    assert torch.equal(argmax_rows(logits, backend="torch"), logits.argmax(-1))


def test_edge_rows():
    rows = torch.full((3, 300), float("-inf"), device=DEVICE)
    rows[1, 17] = float("nan")  # NaN is the largest value, as for torch.argmax
    rows[1, 250] = 5.0
    rows[2, 299] = 1.0  # the last column
    assert argmax_rows(rows, backend="triton").tolist() == [0, 17, 299]
    assert rows.argmax(-1).tolist() == [0, 17, 299]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\]"):
        argmax_rows(torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be"):
        argmax_rows(torch.zeros(2, 3), backend="cuda")


def test_auto_takes_torch_for_few_rows_or_the_cpu():
    logits = torch.randn(4, 10)
    assert torch.equal(argmax_rows(logits), logits.argmax(-1))
