"""Registers and spills of the Taylor kernels for sm_90a, without a GPU.

    python benchmarks/taylor_regs.py [fwd|dq|dkv|all] [KEY=VALUE ...]   (e.g. BT=64 BV=32 WARPS=4)
    python benchmarks/taylor_regs.py [cw_h|cw_o|cw_dh|cw_dq|cw_dkv|cw] [BT=64 BF=64 WARPS=4]   (chunkwise form)

Compiles each kernel's PTX here with triton.compile for GPUTarget("cuda", 90, 64) (d=16, dv=64, bf16,
the benchmark's shape; BT/BV/WARPS apply to whichever kernel is named) and runs ptxas -v on it: the
CUDA 13.4 ptxas-blackwell shipped with Triton 3.9 (its plain ptxas, 12.9, rejects that PTX version).
Set TRITON_DEFAULT_FP_FUSION=1 to silence Triton's warning. Spills show register pressure, not speed:
on the H200 the spill-free backward settings were slower (NOTES-kernels.md, v3).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from based.ops.taylor.triton import chunk, chunkwise  # noqa: E402

# CUDA 13.4; the plain ptxas beside it is 12.9 and rejects Triton 3.9's PTX version.
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
FLOATS = {"scale", "eps"}
INTS = {"T", "TT"}
BF16 = {"q", "k", "v", "o", "do", "dv_out", "dq", "dk", "dv", "h", "dh"}  # h, dh: chunkwise bf16 snapshots
I32 = {"cu_seqlens", "chunk_offsets", "chunk_indices"}


def regs(fn, consts: dict, warps: int, stages: int = 2) -> str:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in INTS:
            sig[name] = "i32"
        elif name in I32:
            sig[name] = "*i32"
        elif name in BF16:
            sig[name] = "*bf16"
        else:
            sig[name] = "*fp32"
    # Triton's JIT marks pointer arguments 16-byte aligned (tt.divisibility); without the hint the PTX
    # loads contiguous tiles element by element and the register count is not the GPU build's.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")}
    src = ASTSource(fn, sig, constexprs={k: v for k, v in consts.items()}, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ck.asm["ptx"])
    out = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True)
    info = out.stderr
    r = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    stack = re.search(r"(\d+) bytes stack frame", info)
    return (f"{fn.fn.__name__}: {r.group(1) if r else '?'} registers, stack {stack.group(1) if stack else '?'} B, "
            f"spill stores {spill.group(1) if spill else '?'} B, loads {spill.group(2) if spill else '?'} B")


def _extra(which):
    f = getattr(chunk, "_bwd_extra", None)
    return f(which) if f else {}


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    kv = dict(a.split("=") for a in sys.argv[2:])
    bt = int(kv.get("BT", 32))
    bv = int(kv.get("BV", 32))
    warps = int(kv.get("WARPS", 4))
    stages = int(kv.get("STAGES", 2))
    import triton.language as tl

    if which.startswith("cw"):
        bf = int(kv.get("BF", 64))
        bt = int(kv.get("BT", 64))
        cw = dict(H=16, D=16, DV=64, BT=bt, BK=16, BF=bf, BV=64, FI=273, FP=triton.cdiv(273, bf) * bf,
                  IS_VARLEN=False, PREC="tf32", SDT=tl.bfloat16)
        nf = dict(NF=triton.cdiv(273, bf))
        kernels = {
            "cw_h": (chunkwise._cw_fwd_h_kernel, dict(cw, USE_INITIAL=False, STORE_FINAL=False)),
            "cw_o": (chunkwise._cw_fwd_o_kernel, dict(cw, **nf)),
            "cw_dh": (chunkwise._cw_bwd_dh_kernel, dict(cw, USE_FINAL_GRAD=False, STORE_INITIAL_GRAD=False)),
            "cw_dq": (chunkwise._cw_bwd_dqkv_kernel, dict(cw, **nf, DO_DQ=True, DO_DKV=False)),
            "cw_dkv": (chunkwise._cw_bwd_dqkv_kernel, dict(cw, **nf, DO_DQ=False, DO_DKV=True)),
        }
        for name, (fn, consts) in kernels.items():
            if which in ("cw", name):
                print(name, regs(fn, consts, warps, int(kv.get("STAGES", 3))))
        return
    base = dict(H=16, D=16, DV=64, BT=bt, BK=16, BI=16, BV=bv, NK=1, IS_VARLEN=False, PREC="tf32")
    if which in ("fwd", "all"):
        fwd = dict(base, USE_INITIAL=False, STORE_FINAL=False, SDT=tl.bfloat16)
        print(regs(chunk._taylor_fwd_kernel, fwd, warps, stages))
    if which in ("dq", "all"):
        print(regs(chunk._taylor_bwd_dq_kernel, dict(base, USE_INITIAL=False, **_extra("dq")), warps, stages))
    if which in ("dkv", "all"):
        print(regs(chunk._taylor_bwd_dkv_kernel, dict(base, USE_FINAL_GRAD=False, STORE_INITIAL_GRAD=False,
                                                      **_extra("dkv")), warps, stages))


if __name__ == "__main__":
    main()
