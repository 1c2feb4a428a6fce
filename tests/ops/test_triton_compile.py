"""The decode-step Triton kernels compile for an H200 (sm_90) on this GPU-less machine.

The CPU tests run the kernels under TRITON_INTERPRET=1, which executes them as NumPy and so misses errors
that only the compiler sees (a loop-carried value changing shape, for one, which once broke the attention
step on the GPU after its interpreted tests had passed). This compiles them to PTX at the shapes of the
1.3b preset, in a child process: the interpreter, once imported, patches Triton's tensor operators for the
whole process.
"""
import json
import os
import subprocess
import sys

import pytest

BF16, F32, I64 = "*bf16", "*fp32", "*i64"
ATTN = dict(s_kb="i64", s_kl="i64", s_vb="i64", s_vl="i64", scale="fp32", L="i32")
# (module, kernel, argument types, constexprs, num_warps)
KERNELS = {
    "attention step, rotary": (
        "based.ops.decode_attn.triton", "_decode_attn_step_kernel",
        dict(q=BF16, k=BF16, v=BF16, s_q="i64", s_k="i64", s_v="i64", inv_freq=F32, k_cache=BF16, v_cache=BF16,
             pos=I64, o=BF16, **ATTN),
        dict(H=16, D=112, DV=112, BH=64, BDV=128, BL=16, ROTARY=True, PDL=True), 1),
    "attention": (
        "based.ops.decode_attn.triton", "_decode_attn_kernel",
        dict(q=BF16, k=BF16, v=BF16, last=I64, o=BF16, **ATTN),
        dict(H=16, D=112, DV=112, BD=128, BDV=128, BL=16), 1),
    "conv step": (
        "based.ops.conv.triton", "_short_conv_step_kernel",
        dict(x=BF16, s_x="i64", gate=BF16, s_g="i64", state=BF16, s_s="i64", w=F32, bias=F32, y=BF16, B="i32", C="i32"),
        dict(K=3, BC=1024, ROWS=8, HAS_BIAS=True, SILU=True, HAS_GATE=True), 4),
    "taylor step": (
        "based.ops.taylor.triton.decode", "_taylor_step_kernel",
        dict(q=BF16, k=BF16, v=BF16, kv=F32, ks=F32, o=BF16, kp=BF16, vp=BF16, np_="*i32", fa="*i32", fb="*i32",
             fc=F32, scale="fp32", eps="fp32"),
        dict(D=16, DV=112, F=153, BF=64, BV=128, P=7, BD=16, BP=8, FOLD_ROWS=8, EVICT=False, PDL=True), 2),
}
GLU = dict(x=BF16, s_x="i64", nw=BF16, w=BF16, b=BF16, y=BF16, s_y="i64", state=BF16, s_sb="i64", s_sk="i64",
           cw=BF16, cb=BF16, K="i32", H="i32", eps="fp32", index=I64, gathered=BF16)
KERNELS["fused projection, norm and residual"] = (
    "based.ops.gemv.triton", "_norm_linear_kernel",
    dict(x=BF16, s_x="i64", nw=BF16, w0=BF16, w1=BF16, w2=BF16, b0=BF16, b1=BF16, b2=BF16, res=BF16, s_r="i64",
         y=BF16, s_y="i64", K="i32", N0="i32", N1="i32", N2="i32", eps="fp32", n_valid="i32", part_v=F32,
         part_i="*i32", count="*i32", ids=I64, advance=I64, log=I64, L="i32", index=I64, gathered=BF16),
    dict(BN=2, BK=4096, NORM=True, HAS_BIAS=True, HAS_RES=True, ARGMAX=False, ADVANCE=False, LOG=False, GP=1,
         GATHER=False, PDL=True), 8)
KERNELS["fused projection, no norm"] = KERNELS["fused projection, norm and residual"][:3] + (
    dict(BN=4, BK=2048, NORM=False, HAS_BIAS=False, HAS_RES=False, ARGMAX=False, ADVANCE=False, LOG=False, GP=1,
         GATHER=True, PDL=False),
    8)
KERNELS["fused LM head and greedy argmax"] = KERNELS["fused projection, norm and residual"][:3] + (
    dict(BN=4, BK=2048, NORM=True, HAS_BIAS=False, HAS_RES=False, ARGMAX=True, ADVANCE=True, LOG=True, GP=1024,
         GATHER=False, PDL=True),
    4)
KERNELS["fused SwiGLU projection"] = ("based.ops.gemv.triton", "_norm_glu_kernel", GLU,
                                      dict(BN=2, BK=2048, NORM=True, HAS_BIAS=False, CONV=False, TAPS=1,
                                           HAS_CB=False, GATHER=False, PDL=True), 8)
KERNELS["fused BaseConv projection and step"] = ("based.ops.gemv.triton", "_norm_glu_kernel", GLU,
                                                 dict(BN=2, BK=2048, NORM=True, HAS_BIAS=True, CONV=True, TAPS=3,
                                                      HAS_CB=True, GATHER=True, PDL=True), 8)
KERNELS["taylor step, split"] = (
    "based.ops.taylor.triton.decode", "_taylor_step_split_kernel",
    dict(q=BF16, k=BF16, v=BF16, kv=F32, ks=F32, o=BF16, kp=BF16, vp=BF16, np_="*i32", part=F32, count="*i32",
         fa="*i32", fb="*i32", fc=F32, scale="fp32", eps="fp32"),
    dict(D=16, DV=112, F=153, BF=16, BV=128, NC=10, NCP=16, P=7, BD=16, BP=8, PDL=True), 4)
KERNELS["argmax rows"] = ("based.ops.argmax.triton", "_argmax_rows_kernel", dict(x=BF16, s_x="i64", out=I64, N="i32"),
                          dict(BLOCK=2048), 8)
KERNELS["argmax, rows split"] = (
    "based.ops.argmax.triton", "_argmax_split_kernel",
    dict(x=BF16, s_x="i64", part_v=F32, part_i="*i32", count="*i32", out=I64, N="i32", CHUNK="i32"),
    dict(S=25, SP=32, BLOCK=1024, PDL=True), 4)
KERNELS["attention step, ring split"] = (
    "based.ops.decode_attn.triton", "_decode_attn_step_split_kernel",
    {**KERNELS["attention step, rotary"][2], "part": F32, "count": "*i32", "RS": "i32"},
    dict(H=16, D=112, DV=112, BH=64, BDV=128, BL=16, NS=9, NSP=16, ROTARY=True, PDL=True), 4)
KERNELS["attention step, whole ring"] = (
    "based.ops.decode_attn.triton", "_decode_attn_step_ring_kernel", KERNELS["attention step, rotary"][2],
    dict(H=16, D=112, DV=112, BH=64, BDV=128, BL=128, ROTARY=True, PDL=True), 8)
KERNELS["attention step, no rotary"] = KERNELS["attention step, rotary"][:3] + (
    {**KERNELS["attention step, rotary"][3], "ROTARY": False, "PDL": False}, 1)
KERNELS["taylor step, resident state"] = (
    "based.ops.taylor.triton.decode", "_taylor_step_resident_kernel", KERNELS["taylor step"][2],
    dict(D=16, DV=112, F=153, BF1=128, BF2=32, BV=128, P=7, BD=16, BP=8, PDL=True), 4)
KERNELS["taylor step, resident state, no pending buffer"] = KERNELS["taylor step, resident state"][:3] + (
    {**KERNELS["taylor step, resident state"][3], "P": 0, "BP": 1}, 4)
KERNELS["taylor step, cache hints"] = KERNELS["taylor step"][:3] + (
    {**KERNELS["taylor step"][3], "EVICT": True, "PDL": False}, 2)
KERNELS["taylor step, no pending buffer"] = KERNELS["taylor step"][:3] + (
    {**KERNELS["taylor step"][3], "P": 0, "BP": 1}, 2)
KERNELS["taylor step, split, no pending buffer"] = KERNELS["taylor step, split"][:3] + (
    {**KERNELS["taylor step, split"][3], "P": 0, "BP": 1}, 4)


def compile_all() -> dict:
    """{case: "ok" or the compiler's error}, compiled for GPUTarget("cuda", 90, 64)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for case, (module, name, types, consts, warps) in KERNELS.items():
        fn = getattr(importlib.import_module(module), name)
        sig = {arg: "constexpr" if arg in consts else types[arg] for arg in fn.arg_names}
        try:
            ptx = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 64),
                                 options={"num_warps": warps}).asm["ptx"]
            results[case] = "ok" if f".entry {name}" in ptx else "no entry point in the PTX"
        except Exception as e:  # noqa: BLE001 - reported per kernel
            results[case] = f"{type(e).__name__}: {e}"
    return results


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(KERNELS))
def test_kernel_compiles_for_sm90(compiled, case):
    assert compiled[case] == "ok", compiled[case]


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print(json.dumps(compile_all()))
