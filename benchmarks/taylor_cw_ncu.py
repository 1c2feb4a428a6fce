"""One forward and backward of the chunkwise Triton form at the benchmark shape, for a profiler:

    ncu --clock-control none --kernel-name regex:_cw_ --launch-skip 4 --launch-count 4 \\
        python benchmarks/taylor_cw_ncu.py [T]

(the first call compiles and warms up; the profiler then sees the 4 kernels of the second).
"""
import sys

import torch

from based.ops.taylor.triton import triton_taylor_linear_attn

T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
q, k = (torch.randn(8, T, 16, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
v = torch.randn(8, T, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
do = torch.randn_like(v)
for _ in range(2):
    torch.autograd.grad(triton_taylor_linear_attn(q, k, v, form="chunkwise")[0], (q, k, v), do)
torch.cuda.synchronize()
