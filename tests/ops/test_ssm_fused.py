"""The Triton selective scan (based/ops/ssm/fused.py) against the fp64 reference scan: outputs, final state,
every gradient, under vmap(grad), at extreme step sizes, and the size of what it saves for backward.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes (set before triton is imported). The
`gpu` tests compare with the chunked PyTorch scan at MQAR sizes: pytest -m gpu tests/ops/test_ssm_fused.py
"""
import json
import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available() and __name__ != "__main__":  # run as a script: the compile check's child
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch.func import grad, vmap  # noqa: E402

from based.ops.ssm import selective_scan  # noqa: E402
from based.ops.ssm.chunk import chunk_selective_scan  # noqa: E402
from based.ops.ssm.fused import fused_selective_scan  # noqa: E402
from tests.conftest import rel_err, saved_numels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "h0")


def _inputs(Bsz, T, Dm, N, seed, groups=0, extreme=False, device=DEVICE):
    """u, delta, A, B, C, D, h0 (B, C [Bsz, T, N], or [Bsz, T, groups, N] when groups > 0)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bsz, T, Dm, generator=g)
    # extreme: steps from ~1e-7 to ~50 and |A| up to ~1e3, so exp(delta A) spans 1 down to an underflow to 0.
    scale = 8.0 if extreme else 1.0
    delta = torch.nn.functional.softplus(scale * torch.randn(Bsz, T, Dm, generator=g))
    A = -torch.exp((3.0 if extreme else 1.0) * torch.randn(Dm, N, generator=g)) * torch.arange(1, N + 1)
    bc = (Bsz, T, groups, N) if groups else (Bsz, T, N)
    B, C = torch.randn(*bc, generator=g), torch.randn(*bc, generator=g)
    D = torch.randn(Dm, generator=g)
    h0 = torch.randn(Bsz, Dm, N, generator=g)
    return [t.to(device) for t in (u, delta, A, B, C, D, h0)]


def _grouped_reference(u, delta, A, B, C, D=None, initial_state=None, output_final_state=False):
    """selective_scan with grouped B, C [b, T, G, N]: each group's channels scanned with its own B, C."""
    if B.dim() == 3:
        return selective_scan(u, delta, A, B, C, D, initial_state, output_final_state)
    G, per = B.shape[2], u.shape[-1] // B.shape[2]
    parts = [
        selective_scan(u[..., s], delta[..., s], A[s], B[:, :, g], C[:, :, g], None if D is None else D[s],
                       None if initial_state is None else initial_state[:, s], output_final_state)
        for g, s in ((g, slice(g * per, (g + 1) * per)) for g in range(G))
    ]
    return torch.cat([p[0] for p in parts], -1), (torch.cat([p[1] for p in parts], 1) if output_final_state else None)


def _run(scan, inputs, dtype, with_state=True, **kw):
    """y, final state and the gradients of a fixed random loss of both, in the inputs' order."""
    leaves = [t.to(dtype).clone().requires_grad_() for t in inputs]
    y, h = scan(*leaves[:6], initial_state=leaves[6] if with_state else None, output_final_state=True, **kw)
    g = torch.Generator().manual_seed(2)
    wy, wh = torch.randn(y.shape, generator=g).to(y), torch.randn(h.shape, generator=g).to(h)
    ((y * wy).sum() + (h * wh).sum()).backward()
    return [y, h] + [t.grad for t in leaves]


def _check(inputs, with_state=True, y_tol=1e-5, grad_tol=1e-4, **kw):
    got = _run(fused_selective_scan, inputs, torch.float32, with_state, **kw)
    ref = _run(_grouped_reference, inputs, torch.float64, with_state)
    for name, a, b in zip(("y", "final_state") + NAMES, got, ref):
        if name == "h0" and not with_state:
            continue
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        assert rel_err(a, b) < (y_tol if name in ("y", "final_state") else grad_tol), name


# (33, 16, 5, 16): ~45 s under the interpreter, so -m slow; odd N across chunks is covered by (21, 6, 3, 8) too.
@pytest.mark.parametrize("T, Dm, N, chunk_size", [(5, 4, 2, None), (21, 6, 3, 8),
                                                  pytest.param(33, 16, 5, 16, marks=pytest.mark.slow), (40, 4, 4, 4)])
@pytest.mark.parametrize("with_state", [True, False])
def test_matches_reference(T, Dm, N, chunk_size, with_state):
    _check(_inputs(2, T, Dm, N, seed=T + Dm), with_state=with_state, chunk_size=chunk_size)


def test_extreme_steps_and_decays_stay_finite():
    inputs = _inputs(2, 37, 6, 4, seed=5, extreme=True)
    assert torch.isfinite(_run(_grouped_reference, inputs, torch.float64)[0]).all()
    _check(inputs, chunk_size=8)


def test_grouped_B_C():
    _check(_inputs(2, 19, 8, 3, seed=7, groups=2), chunk_size=8)


def test_backward_programs_split_groups(monkeypatch):
    """Small tiles, so a group's channels span several backward programs of several blocks each: the per-program
    dB, dC partials summed in PyTorch, the carries (dh, dA, dD) kept per block across chunks, T not a multiple
    of the chunk. No atomics: two backward passes agree bit for bit."""
    from based.ops.ssm import fused

    monkeypatch.setattr(fused, "TILE_BWD", 64)  # CH 8, BN 4: BD = 2 channels a block
    monkeypatch.setattr(fused, "CHANNELS_BWD", 4)  # 2 blocks a program, 2 programs a group of 8
    meta = fused._bwd_meta(21, 16, 2, 3, 8)
    assert (meta["BD"], meta["SUB"], meta["P"]) == (2, 2, 4)
    inputs = _inputs(2, 21, 16, 3, seed=11, groups=2)
    _check(inputs, chunk_size=8)
    first, second = (_run(fused_selective_scan, inputs, torch.float32, chunk_size=8)[2:] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("N, groups", [(5, 2), (3, 0)])
def test_backward_in_blocks_of_states(monkeypatch, N, groups):
    """N looped over in blocks of STATES_BWD inside a backward program (MQAR's 24 in 3 x 8), the last block
    part padding: the sums over n carried across blocks in fp32 scratch, dB, dC, dA, dh per block."""
    from based.ops.ssm import fused

    monkeypatch.setattr(fused, "STATES_BWD", 2)
    assert fused._bwd_meta(21, 8, 2, N, 8)["NB"] == math.ceil(N / 2)
    inputs = _inputs(2, 21, 8, N, seed=13, groups=groups)
    _check(inputs, chunk_size=8)  # fp32: the partial sums live in du, ddelta
    # other dtypes keep them in fp32 scratch
    got = _run(fused_selective_scan, inputs, torch.float64, chunk_size=8)
    ref = _run(_grouped_reference, inputs, torch.float64)
    for name, a, b in zip(("y", "final_state") + NAMES, got, ref):
        assert rel_err(a, b) < 1e-4, name


@pytest.mark.parametrize("N, groups, blocks", [(24, 2, [16, 8]), (7, 0, [4, 2, 1])])
def test_forward_in_blocks_of_states(N, groups, blocks):
    """N that is not a power of two runs one forward launch per power-of-two block of states (MQAR's 24 as
    16 + 8, not padded to 32): y summed across the launches (in y when fp32, else in fp32 scratch), each block's
    final state and checkpoints (so the backward too) in its own columns, a middle block at N = 7."""
    from based.ops.ssm import fused

    assert [BN for _, BN in fused._state_blocks(N)] == blocks
    inputs = _inputs(2, 11, 4, N, seed=17, groups=groups)  # small (2 chunks, the last partial): the interpreter is slow
    _check(inputs, chunk_size=8)
    _check(inputs, with_state=False, chunk_size=8)
    got = _run(fused_selective_scan, inputs, torch.float64, chunk_size=8)  # the scratch path
    ref = _run(_grouped_reference, inputs, torch.float64)
    for name, a, b in zip(("y", "final_state") + NAMES, got, ref):
        assert rel_err(a, b) < 1e-4, name


def test_without_D_or_state():
    u, delta, A, B, C, _, _ = _inputs(2, 11, 4, 3, seed=3)
    y_ref = selective_scan(u.double(), delta.double(), A.double(), B.double(), C.double())[0]
    y, h = fused_selective_scan(u, delta, A, B, C)
    assert h is None and rel_err(y, y_ref) < 1e-5
    with torch.no_grad():  # the inference form, which keeps no checkpoints
        assert rel_err(fused_selective_scan(u, delta, A, B, C)[0], y_ref) < 1e-5
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C)]
    ref_leaves = [t.double().clone().requires_grad_() for t in (u, delta, A, B, C)]
    fused_selective_scan(*leaves)[0].sum().backward()
    selective_scan(*ref_leaves)[0].sum().backward()
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 1e-4, name


def test_saves_no_state_per_step():
    """What autograd keeps is the inputs and the chunk-start states: nothing of size [b, T, D, N]."""
    Bsz, T, Dm, N = 2, 40, 8, 4
    leaves = [t.requires_grad_() for t in _inputs(Bsz, T, Dm, N, seed=1)]
    saved = saved_numels(lambda: fused_selective_scan(*leaves[:6], initial_state=leaves[6], output_final_state=True,
                                                      chunk_size=8))
    checkpoints = math.ceil(T / 8) * Bsz * Dm * N
    assert max(saved) <= Bsz * T * Dm
    assert sum(saved) == 2 * Bsz * T * Dm + 2 * Bsz * T * N + Dm * N + Dm + checkpoints


def _loss(scan):
    def loss(u, delta, A, B, C, D, w):
        y, h = scan(u, delta, A, B, C, D, output_final_state=True)
        return (y * w).sum() + h.square().sum()
    return loss


@pytest.mark.parametrize("shared, runs_first", [
    ((), False), pytest.param((), True, marks=pytest.mark.slow),
    pytest.param(("u", "delta", "B", "C"), False, marks=pytest.mark.slow),
], ids=["all_batched", "all_batched_runs_first_out", "shared_inputs"])
# -m slow (~15-20 s each interpreted): shared inputs, and RUNS_FIRST_OUT (off: no gain on an H100, docs/mqar.md)
def test_vmap_grad_matches_reference_per_run(shared, runs_first, monkeypatch):
    """vmap(grad) over k = 3 runs (the stacked MQAR trainer) against the reference run by run; `shared`
    inputs are one tensor for all runs (in_dims None); runs_first: outputs copied runs-first (RUNS_FIRST_OUT)."""
    from based.ops.ssm import fused

    monkeypatch.setattr(fused, "RUNS_FIRST_OUT", runs_first)
    k, argnums = 3, (0, 1, 2, 3, 4, 5)
    per_run = [_inputs(2, 21, 4, 3, seed=10 + r) for r in range(k)]
    stacked = [torch.stack(ts) for ts in zip(*per_run)][:6] + [torch.randn(k, 2, 21, 4, device=DEVICE)]
    in_dims = tuple(None if n in shared else 0 for n in NAMES[:6]) + (0,)
    args = [s[0] if d is None else s for s, d in zip(stacked, in_dims)]
    got = vmap(grad(_loss(fused_selective_scan), argnums=argnums), in_dims=in_dims)(*args)
    for r in range(k):
        run_args = [(a if d is None else a[r]).double() for a, d in zip(args, in_dims)]
        ref = grad(_loss(selective_scan), argnums=argnums)(*run_args)
        for name, a, b in zip(NAMES, got, ref):
            assert rel_err(a[r], b) < 1e-4, (name, r)


def compile_for_sm90() -> dict:
    """{kernel at N: "ok" or the compiler's error}: both kernels at MQAR's tile shapes (T 256, d_inner 512, and
    4 runs folded into 2048 channels, 4 groups)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from based.ops.ssm import fused

    results = {}
    for N, dim, groups in ((8, 512, 1), (24, 512, 1), (24, 2048, 4)):
        fwd = []  # one launch per block of states
        for meta in fused._fwd_launches(256, dim, groups, N):
            options = {"num_warps": meta.pop("num_warps")}
            meta.pop("programs")
            fwd.append((fused._fwd_kernel, dict(HAS_D=True, HAS_H0=True, SAVE_CKPT=True, **meta),
                        ("T", "DIM", "G", "N", "DG", "NC"), options))
        for fn, consts, ints, options in fwd + [
            (fused._bwd_kernel, fused._bwd_meta(256, dim, groups, N), ("T", "NC"),
             {"num_warps": fused.NUM_WARPS_BWD, "maxnreg": fused.MAXNREG_BWD}),
        ]:
            sig = {a: "constexpr" if a in consts else "i32" if a in ints else "*fp32" for a in fn.arg_names}
            name = f"{fn.__name__} N={N} D={dim} G={groups}" + (f" states {consts['N0']}+" if "N0" in consts else "")
            try:
                ptx = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 64),
                                     options=options).asm["ptx"]
                results[name] = "ok" if f".entry {fn.__name__}" in ptx else "no entry point in the PTX"
            except Exception as e:  # noqa: BLE001 - reported per kernel
                results[name] = f"{type(e).__name__}: {e}"
    return results


def test_kernels_compile_for_sm90():
    """The interpreter runs kernels as NumPy and misses what only the compiler sees (the 3D scans, for one):
    compile both for an H100 in a child process, where TRITON_INTERPRET is unset (tests/ops/test_triton_compile.py)."""
    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results and all(v == "ok" for v in results.values()), results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("with_state", [False, True])
def test_gpu_matches_chunked_scan_at_mqar_size(with_state):
    """d_inner 512, N 24, T 256, batch 64: outputs, final state, every gradient against the chunked scan."""
    inputs = _inputs(64, 256, 512, 24, seed=0, device="cuda")
    with torch.enable_grad():
        got = _run(fused_selective_scan, inputs, torch.float32, with_state)
        ref = _run(chunk_selective_scan, inputs, torch.float32, with_state)
    for name, a, b in zip(("y", "final_state") + NAMES, got, ref):
        if name == "h0" and not with_state:
            continue
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_vmap_grad_at_mqar_size():
    """4 stacked runs of d_inner 512, N 24, T 256, batch 64 against the chunked scan run by run."""
    k, argnums = 4, (0, 1, 2, 3, 4, 5)
    stacked = [torch.stack(ts) for ts in zip(*(_inputs(64, 256, 512, 24, seed=r, device="cuda") for r in range(k)))]
    w = torch.randn(k, 64, 256, 512, device="cuda")
    got = vmap(grad(_loss(fused_selective_scan), argnums=argnums))(*stacked[:6], w)
    for r in range(k):
        ref = grad(_loss(chunk_selective_scan), argnums=argnums)(*(s[r] for s in stacked[:6]), w[r])
        for name, a, b in zip(NAMES, got, ref):
            assert rel_err(a[r], b) < 1e-4, (name, r)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mamba_layer_takes_the_fused_scan(monkeypatch):
    """The Mamba layer on CUDA (fused scan) against the same layer made to take the chunked scan."""
    from based.layers import mamba

    layer = mamba.Mamba(128, d_state=16).cuda()
    x = torch.randn(8, 96, 128, device="cuda")
    results = []
    for fused in (mamba.fused_selective_scan, None):
        monkeypatch.setattr(mamba, "fused_selective_scan", fused)
        layer.zero_grad()
        with torch.enable_grad():
            y = layer(x)
            y.square().sum().backward()
        results.append([y.detach()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-4
