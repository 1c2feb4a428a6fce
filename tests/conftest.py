import os

import pytest
import torch

# Without CUDA, Triton kernels run through the interpreter (tests/ops/test_taylor_triton.py). It must be
# chosen before triton is first imported, and `import based` imports it (transformers -> torch._dynamo).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the error measure fla's tests use."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
