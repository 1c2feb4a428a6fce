import os

import pytest
import torch

# Without CUDA, Triton kernels run through the interpreter (tests/ops/test_taylor_triton.py). It must be
# chosen before triton is first imported, and `import based` imports it (transformers -> torch._dynamo).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The processes tests start (servers, torchrun, CLI runs) inherit one OpenMP thread: under `-n 2` on two
# cores, two workers' children each spinning up a thread per core slow each other tenfold.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite's models and ops are tiny: intra-op threads only add waiting, and on a busy 2-core machine
    # they wait for each other at every op (one masked SDPA decode call: 16 ms on 2 threads, 0.02 ms on 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _matmul_precision():
    # A test that turns on TF32 ("high") must not leave it on: later fp32 comparisons on CUDA (the stacked
    # trainer's CUDA-vs-CPU test) would run their matmuls in TF32 and fail by 1e-4.
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


def saved_numels(fn) -> list[int]:
    """fn() run under a saved-tensors hook: the sizes (numel) of the tensors autograd kept for its backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fn()
    return saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the error measure fla's tests use."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
