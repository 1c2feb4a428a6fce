"""The fused Triton linear cross-entropy (based/ops/cross_entropy/fused.py) against F.cross_entropy of the logits in
fp64: loss and the gradients of hidden and weight, with ignored rows, vocabularies and widths that leave partial
tiles, and under vmap(grad) over stacked runs with shared targets (the MQAR trainer) and per-run ones.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes (tests/conftest.py); a child process compiles
them for sm_90. `pytest -m gpu tests/ops/test_cross_entropy_fused.py` compares at the MQAR sweep's sizes.

The kernels' paths: widths D <= 128 load whole [BM, BD] / [BV, BD] tiles (16; 40, not a power of 2; 128),
wider ones walk D in chunks (136); the vocabulary split in parts (SPLIT > 1) at few rows, merged in PyTorch.
Small tiles (BASED_CE_TILES) give tiny shapes several row and vocabulary tiles, BASED_CE_SPLIT forces the split.
"""
import json
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and __name__ != "__main__":  # run as a script: the compile check's child
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from torch.func import grad, vmap  # noqa: E402

from based.ops.cross_entropy import linear_cross_entropy  # noqa: E402
from based.ops.cross_entropy import fused  # noqa: E402
from based.ops.cross_entropy.fused import LinearCE, fused_linear_cross_entropy  # noqa: E402
from tests.conftest import rel_err, saved_numels  # noqa: E402
from tests.ops._triton_check import assert_compiles, ptx_status, signature  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(N, V, D, seed, runs=0, ignored=0.25, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    lead = (runs,) if runs else ()
    h = torch.randn(*lead, N, D, generator=g)
    w = torch.randn(*lead, V, D, generator=g) / D**0.5 * 3  # logits of a few units: a peaked softmax
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignored] = -100
    return [x.to(device) for x in (h, w, t)]


def _ref(h, w, t):
    return F.cross_entropy(h.double() @ w.double().T, t, ignore_index=-100)


def _run(op, h, w, t, dtype):
    leaves = [h.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()]
    loss = op(*leaves, t)
    loss.backward()
    return [loss] + [x.grad for x in leaves]


@pytest.mark.parametrize("N, V, D", [(5, 7, 3), (70, 130, 48), (33, 64, 64), (9, 200, 130), (1, 1, 16)])
def test_matches_torch(N, V, D):
    h, w, t = _inputs(N, V, D, seed=N + V + D, ignored=0.25 if N > 1 else 0.0)
    got, want = _run(fused_linear_cross_entropy, h, w, t, torch.float32), _run(_ref, h, w, t, torch.float64)
    for name, a, b in zip(("loss", "hidden", "weight"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-5, name
    assert (got[1][t == -100] == 0).all()  # an ignored row gets no gradient


def test_large_logits_do_not_overflow():
    h, w, t = _inputs(6, 50, 8, seed=3, ignored=0.0)
    got = _run(fused_linear_cross_entropy, h * 40, w, t, torch.float32)  # logits of several hundred
    want = _run(_ref, h * 40, w, t, torch.float64)
    for name, a, b in zip(("loss", "hidden", "weight"), got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5, name


def test_every_row_ignored_gives_nan_as_torch():
    h, w, t = _inputs(4, 9, 8, seed=1)
    t[:] = -100
    assert torch.isnan(fused_linear_cross_entropy(h, w, t)) and torch.isnan(F.cross_entropy(h @ w.T, t))


def test_a_target_out_of_range_makes_the_loss_nan():
    """F.cross_entropy raises; the kernel cannot stop without a host sync, so the loss says it."""
    h, w, t = _inputs(6, 9, 8, seed=5, ignored=0.0)
    for bad in (9, -3):
        t2 = t.clone()
        t2[2] = bad
        assert torch.isnan(fused_linear_cross_entropy(h, w, t2))
    assert torch.isfinite(fused_linear_cross_entropy(h, w, t))


def test_saves_inputs_and_one_number_per_row():
    """Autograd keeps hidden, weight, targets and each row's log-sum-exp: no [N, V] tensor."""
    h, w, t = _inputs(12, 40, 8, seed=2)
    saved = saved_numels(lambda: fused_linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), t))
    assert max(saved) == w.numel() and 12 * 40 not in saved


@pytest.mark.parametrize("per_run_targets", [False, True], ids=["shared_targets", "per_run_targets"])
def test_vmap_grad_matches_torch_per_run(per_run_targets):
    """vmap(grad) over k = 3 runs (the stacked MQAR trainer: hidden and weight per run, targets shared)."""
    _check_vmap_grad(*_inputs(10, 37, 12, seed=9, runs=3), per_run_targets)


def _check_vmap_grad(h, w, t, per_run_targets):
    """vmap(grad) of the fused loss over the runs of h, w (targets t shared, or rolled per run) against each
    run's fp64 reference; the gradients and the targets each run saw."""
    runs = h.shape[0]
    targets = torch.stack([t.roll(i) for i in range(runs)]) if per_run_targets else t
    in_dims = (0, 0, 0 if per_run_targets else None)
    got = vmap(grad(fused_linear_cross_entropy, argnums=(0, 1)), in_dims=in_dims)(h, w, targets)
    seen = []
    for i in range(runs):
        ti = targets[i] if per_run_targets else t
        want = grad(_ref, argnums=(0, 1))(h[i].double(), w[i].double(), ti)
        for name, a, b in zip(("hidden", "weight"), got, want):
            assert rel_err(a[i], b) < 1e-5, (name, i)
        seen.append(ti)
    return got, seen


def test_dispatch(monkeypatch):
    from based.ops import cross_entropy

    calls = []
    monkeypatch.setattr(cross_entropy, "fused_linear_cross_entropy",
                        lambda *a: calls.append(1) or fused_linear_cross_entropy(*a))
    h, w, t = _inputs(12, 20, 8, seed=0)
    loss = linear_cross_entropy(h.view(3, 4, 8), w, t.view(3, 4))
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    assert rel_err(loss, _ref(h, w, t)) < 1e-6
    h2, w2, t2 = _inputs(6, 20, 200, seed=1)  # wider than ONE_K_MAX: PyTorch's form (the faster there)
    assert rel_err(linear_cross_entropy(h2, w2, t2), _ref(h2, w2, t2)) < 1e-6
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    monkeypatch.setenv("BASED_CE_FUSED", "0")
    linear_cross_entropy(h, w, t)
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    with pytest.raises(ValueError, match="targets of its leading shape"):
        linear_cross_entropy(h, w, t[:5])
    # the kernels' own entry takes rows only: leading dims there would be read as the wrong rows
    for args in ((h.view(3, 4, 8), w, t.view(3, 4)), (h, w, t[:5]), (h, w[:, :7], t)):
        with pytest.raises(ValueError, match=r"hidden \[N, D\], weight \[V, D\] and targets \[N\] needed"):
            fused_linear_cross_entropy(*args)


SMALL_TILES = "16x32x4x1"  # BM 16, BV 32: several tiles of each kind at a few dozen rows and words


def _check(got, want, t, tol=1e-5):
    for name, a, b in zip(("loss", "hidden", "weight"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    assert (got[1][t == -100] == 0).all()


@pytest.mark.parametrize("D", [16, 40, 128, 136])
@pytest.mark.parametrize("split", [1, 4])
def test_paths_match_torch(D, split, monkeypatch):
    """Whole-width tiles (D <= 128) and chunked ones (136), the vocabulary (4 tiles of 32, the last partial)
    in 1 part or 4, partial row and width tiles."""
    monkeypatch.setenv("BASED_CE_TILES", SMALL_TILES)
    monkeypatch.setenv("BASED_CE_SPLIT", str(split))
    N, V = 20, 100
    h, w, t = _inputs(N, V, D, seed=D + split)
    for backward in (False, True):
        c, parts, per = fused._plan(h, 1, N, V, D, backward)
        assert (c.one_k, parts, per) == (D <= 128, split, 4 // split)
    _check(_run(fused_linear_cross_entropy, h, w, t, torch.float32), _run(_ref, h, w, t, torch.float64), t)


@pytest.mark.parametrize("per_run_targets", [False, True], ids=["shared_targets", "per_run_targets"])
@pytest.mark.parametrize("D", [40])
def test_vmap_grad_split_matches_torch(D, per_run_targets, monkeypatch):
    """vmap(grad) over 3 runs with the vocabulary in 2 parts: the runs' rows, weights and targets kept apart."""
    monkeypatch.setenv("BASED_CE_TILES", SMALL_TILES)
    monkeypatch.setenv("BASED_CE_SPLIT", "2")
    got, seen = _check_vmap_grad(*_inputs(12, 70, D, seed=D, runs=3), per_run_targets)
    for i, ti in enumerate(seen):
        assert (got[0][i][ti == -100] == 0).all()


def test_split_rows_nan_and_ignored(monkeypatch):
    """Merged parts: an ignored row's loss is 0, an out-of-range target's NaN (its row only), lse exact."""
    monkeypatch.setenv("BASED_CE_TILES", SMALL_TILES)
    monkeypatch.setenv("BASED_CE_SPLIT", "4")
    h, w, t = _inputs(9, 130, 24, seed=4, ignored=0.0)
    t[1], t[2], t[3] = -100, 130, -5
    nll, lse = LinearCE.apply(h, w.unsqueeze(0), t.unsqueeze(0), -100)
    z = h.double() @ w.double().T
    want_lse = z.logsumexp(-1)
    assert rel_err(lse, want_lse) < 1e-6
    assert nll[1] == 0 and torch.isnan(nll[2]) and torch.isnan(nll[3])
    keep = torch.tensor([i not in (1, 2, 3) for i in range(9)])
    want = want_lse - z.gather(1, t.clamp(0, 129)[:, None])[:, 0]
    assert rel_err(nll[keep], want[keep]) < 1e-6


def test_default_tiles_split_by_the_heuristic():
    """The tables' tiles (BD 16: BV 64 forward, 128 backward) on 5 rows of a 1024-word vocabulary: few
    programs, so the split is taken (4 parts forward, 2 backward, of 4 vocabulary tiles each)."""
    h, w, t = _inputs(5, 1024, 16, seed=6, ignored=0.2)
    assert fused._plan(h, 1, 5, 1024, 16, False)[1:] == (4, 4)
    assert fused._plan(h, 1, 5, 1024, 16, True)[1:] == (2, 4)
    _check(_run(fused_linear_cross_entropy, h, w, t, torch.float32), _run(_ref, h, w, t, torch.float64), t)


def test_split_count_and_tiles_spec(monkeypatch):
    assert fused.split_count(32, 64, 132) == (8, 8)  # 1024 rows x 4 runs at BM 128 on an H100
    assert fused.split_count(512, 64, 132) == (1, 64)  # 16k rows x 4 runs: one part
    assert fused.split_count(128, 64, 132) == (3, 22)  # parts of 22, 22, 20 tiles
    assert fused.split_count(1, 3, 132) == (1, 3)  # parts of at least 4 tiles
    monkeypatch.setenv("BASED_CE_SPLIT", "5")
    assert fused.split_count(10**6, 7, 132) == (4, 2)  # forced; no empty part
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("BASED_CE_SPLIT", bad)
        with pytest.raises(ValueError, match="BASED_CE_SPLIT must be a positive number"):
            fused.split_count(32, 64, 132)
    assert fused.parse_tiles("64x128x4") == (64, 128, 4, 2) and fused.parse_tiles("128X64x8x3") == (128, 64, 8, 3)
    for bad in ("64x64", "48x64x4", "8x64x4", "64x64x3x2", "a"):
        with pytest.raises(ValueError):
            fused.parse_tiles(bad)
    monkeypatch.setenv("BASED_CE_TILES", "128x128x8x3,64x64x4x2")
    assert fused.config(100) == (128, 128, 128, 8, 3, True)
    assert fused.config(100, backward=True) == (64, 64, 128, 4, 2, True)
    monkeypatch.delenv("BASED_CE_TILES")
    assert fused.config(200).one_k is False and fused.config(200).BD == 256


SHARED_MEMORY_SM90 = 232448  # bytes a block may take on an H100 (227 KB)


def compile_for_sm90() -> dict:
    """{kernel: "ok" or the compiler's error}: every kernel and constexpr variant at the tables' tiles, at the
    widths 128 (whole-width tiles, the most shared memory of them) and 256 (D in chunks), the forward with and
    without the vocabulary split's partials (at 128: the epilogue is the same code at every width); "ok" also
    says that the kernel's shared memory fits an H100."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for D in (128, 256):
        for fn, backward, partial in ((fused._fwd_kernel, False, False), (fused._fwd_kernel, False, True),
                                      (fused._dh_kernel, True, None), (fused._dw_kernel, True, None)):
            if partial and D != 128:
                continue
            c = fused.config(D, backward)
            consts = dict(IGNORE=-100, BM=c.BM, BV=c.BV, BK=fused.BLOCK_K, BD=c.BD, ONE_K=c.one_k, PREC="tf32")
            if partial is not None:
                consts["PARTIAL"] = partial
            sig = signature(fn, consts, ints=("RN", "V", "D", "s_tr", "TPS"), pointers={"t": "*i64"})
            name = f"{fn.__name__}_D{D}" + ("_partial" if partial else "")
            options = {"num_warps": c.warps, "num_stages": c.stages}
            results[name] = status = ptx_status(fn, sig, consts, options)
            if status == "ok":  # from Triton's cache: the build ptx_status made
                shared = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 64),
                                        options=options).metadata.shared
                if shared > SHARED_MEMORY_SM90:
                    results[name] = f"{shared} bytes of shared memory, more than an H100's {SHARED_MEMORY_SM90}"
    return results


def test_kernels_compile_for_sm90():
    assert_compiles(__file__)


if __name__ == "__main__":
    print(json.dumps(compile_for_sm90()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_vmap_matches_torch_at_sweep_size(D, monkeypatch):
    """4 stacked runs, 256 examples x 64 queries, vocabulary 8192, TF32 both ways: losses and gradients."""
    torch.set_float32_matmul_precision("high")
    h, w, t = _inputs(256 * 64, 8192, D, seed=0, runs=4)

    def torch_form(h, w, t):
        return F.cross_entropy(h @ w.T, t, ignore_index=-100)

    got = vmap(grad(fused_linear_cross_entropy, argnums=(0, 1), has_aux=False), in_dims=(0, 0, None))(h, w, t)
    for i in range(4):
        want = grad(torch_form, argnums=(0, 1))(h[i], w[i], t)
        for name, a, b in zip(("hidden", "weight"), got, want):
            assert rel_err(a[i], b) < 3e-3, (name, i)  # TF32 on both sides, different summation orders


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 256])
def test_gpu_vmap_split_matches_torch_at_few_queries(D):
    """4 stacked runs of 256 examples x 4 queries (1024 rows a run): the vocabulary split in parts, TF32."""
    torch.set_float32_matmul_precision("high")
    h, w, t = _inputs(256 * 4, 8192, D, seed=1, runs=4)
    assert fused._plan(h, 4, 256 * 4, 8192, D, False)[1] > 1 and fused._plan(h, 4, 256 * 4, 8192, D, True)[1] > 1

    def torch_form(h, w, t):
        return F.cross_entropy(h @ w.T, t, ignore_index=-100)

    loss = vmap(fused_linear_cross_entropy, in_dims=(0, 0, None))(h, w, t)
    got = vmap(grad(fused_linear_cross_entropy, argnums=(0, 1)), in_dims=(0, 0, None))(h, w, t)
    for i in range(4):
        assert rel_err(loss[i], torch_form(h[i], w[i], t)) < 1e-3, i
        want = grad(torch_form, argnums=(0, 1))(h[i], w[i], t)
        for name, a, b in zip(("hidden", "weight"), got, want):
            assert rel_err(a[i], b) < 3e-3, (name, i)
