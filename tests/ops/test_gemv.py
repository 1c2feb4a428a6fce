"""based.ops.gemv: the small-batch fused projections, Triton (interpreted without CUDA) against the PyTorch form,
which is the layers' own arithmetic, and both against an fp64 reference."""
import pytest
import torch
import torch.nn.functional as F

from based.ops import conv_state_zeros
from based.ops.gemv import MAX_K, MAX_ROWS, norm_glu, norm_linear, norm_linear_argmax
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_linear(x, weights, biases, nw, eps, residual):
    """fp64: [residual +] rmsnorm(x) @ W.T + b, no intermediate rounding."""
    h = x.double()
    if nw is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * nw.double()
    y = torch.cat([h @ w.double().t() + (0 if b is None else b.double()) for w, b in zip(weights, biases)], -1)
    return y if residual is None else residual.double() + y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "M,K,Ns,bias,norm,res",
    [
        (1, 40, [5], False, False, False),  # plain, K not a power of two, N not a multiple of the block
        (3, 64, [8, 6, 13], True, True, False),  # three weights (q, k, v), their biases, the norm
        (2, 33, [7, 9], True, True, True),  # two weights and the residual add
        (1, 4100, [3], False, True, True),  # K past 4096: an 8192-wide row, 16 warps
        (16, 40, [5, 3], True, True, True),  # the most rows of x the kernels take
    ],
)
def test_norm_linear_matches_reference(dtype, M, K, Ns, bias, norm, res):
    x = torch.randn(M, K, dtype=dtype)
    weights = [torch.randn(n, K, dtype=dtype) / K**0.5 for n in Ns]
    biases = [torch.randn(n, dtype=dtype) if bias else None for n in Ns]
    nw = torch.randn(K, dtype=dtype) if norm else None
    residual = torch.randn(M, sum(Ns), dtype=dtype) if res else None
    w = weights if len(Ns) > 1 else weights[0]
    b = (biases if len(Ns) > 1 else biases[0]) if bias else None
    ref = reference_linear(x, weights, biases, nw, 1e-5, residual)
    eager = norm_linear(x, w, b, nw, 1e-5, residual, backend="torch")
    fused = norm_linear(x.to(DEVICE), [t.to(DEVICE) for t in weights] if len(Ns) > 1 else w.to(DEVICE),
                        None if b is None else [t.to(DEVICE) for t in b] if len(Ns) > 1 else b.to(DEVICE),
                        None if nw is None else nw.to(DEVICE), 1e-5,
                        None if residual is None else residual.to(DEVICE), backend="triton").cpu()
    assert fused.shape == eager.shape == (M, sum(Ns)) and fused.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the norm, output and add apart
    assert rel_err(eager, ref) < tol and rel_err(fused, ref) < tol
    if dtype == torch.float32:
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_norm_linear_with_some_biases_missing():
    x, ws = torch.randn(2, 16), [torch.randn(4, 16), torch.randn(3, 16)]
    biases = [None, torch.randn(3)]
    expected = torch.cat([x @ ws[0].t(), x @ ws[1].t() + biases[1]], -1)
    for backend in ("torch", "triton"):
        got = norm_linear(x.to(DEVICE), [w.to(DEVICE) for w in ws], [None, biases[1].to(DEVICE)], backend=backend)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


def reference_glu(x, w, b, nw, eps, conv_state=None, cw=None, cb=None):
    a, g = reference_linear(x, [w], [b], nw, eps, None).chunk(2, -1)
    if conv_state is None:
        return a * F.silu(g), None
    taps = torch.cat([conv_state.double()[..., 1:], a.unsqueeze(-1)], -1)  # [M, H, taps], newest last
    y = (taps * cw.double()).sum(-1) + (0 if cb is None else cb.double())
    return F.silu(y) * g, taps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,H,conv,bias", [(1, 24, 5, False, False), (3, 40, 9, False, True),
                                             (1, 24, 5, True, True), (2, 40, 11, True, False),
                                             (16, 24, 5, True, True)])
def test_norm_glu_swiglu_and_conv_step(dtype, M, K, H, conv, bias):
    """SwiGLU's a * silu(b), and BaseConv's silu(conv(a)) * b with a shifted into the tap-major state."""
    taps = 3
    x = torch.randn(M, K, dtype=dtype)
    w = torch.randn(2 * H, K, dtype=dtype) / K**0.5
    b = torch.randn(2 * H, dtype=dtype) if bias else None
    nw = torch.randn(K, dtype=dtype)
    state = conv_state_zeros(M, H, taps, dtype)
    state.copy_(torch.randn(M, H, taps, dtype=dtype))
    cw, cb = torch.randn(H, taps, dtype=dtype), torch.randn(H, dtype=dtype) if bias else None
    ref, ref_taps = reference_glu(x, w, b, nw, 1e-5, state if conv else None, cw, cb)
    conv_args = {}
    results = {}
    for backend, device in (("torch", "cpu"), ("triton", DEVICE)):
        s = conv_state_zeros(M, H, taps, dtype, device)
        s.copy_(state)
        if conv:
            conv_args = dict(conv_state=s, conv_weight=cw.to(device), conv_bias=None if cb is None else cb.to(device))
        out = norm_glu(x.to(device), w.to(device), None if b is None else b.to(device), nw.to(device), 1e-5,
                       **conv_args, backend=backend)
        results[backend] = out.cpu(), s.cpu()
        assert out.shape == (M, H) and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for out, s in results.values():
        assert rel_err(out, ref) < tol
        if conv:
            assert rel_err(s, ref_taps) < tol
        else:
            assert torch.equal(s, state)  # no conv: the state is not touched
    if dtype == torch.float32:
        torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)


def test_rows_of_x_may_be_strided():
    x = torch.randn(3, 50)[:, 2:42]  # row stride 50
    w, nw = torch.randn(6, 40), torch.randn(40)
    torch.testing.assert_close(
        norm_linear(x.to(DEVICE), w.to(DEVICE), norm_weight=nw.to(DEVICE), backend="triton").cpu(),
        norm_linear(x, w, norm_weight=nw, backend="torch"), rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_fix():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"x must be \[rows, K\]"):
        norm_linear(torch.randn(8), w)
    with pytest.raises(ValueError, match=r"each weight must be \[N, K=8\]"):
        norm_linear(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="one to three weights"):
        norm_linear(x, [w] * 4)
    with pytest.raises(ValueError, match=r"2 weights need as many biases"):
        norm_linear(x, [w, w], [None])
    with pytest.raises(ValueError, match=r"norm_weight must be \[K=8\]"):
        norm_linear(x, w, norm_weight=torch.ones(7))
    with pytest.raises(ValueError, match=r"residual must be \[rows, N\]=\(2, 4\)"):
        norm_linear(x, w, residual=torch.randn(2, 5))
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        norm_linear(torch.randn(MAX_ROWS + 1, 8), w, backend="triton")
    with pytest.raises(ValueError, match=f"K <= {MAX_K}"):
        norm_linear(torch.randn(1, MAX_K + 1), torch.randn(2, MAX_K + 1), backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        norm_linear(x, w, backend="cuda")
    with pytest.raises(ValueError, match=r"two halves"):
        norm_glu(x, torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"conv_weight must be \[H=2, taps\]"):
        norm_glu(x, w, conv_state=conv_state_zeros(2, 2, 3))
    with pytest.raises(ValueError, match=r"conv_state must be \[rows, H, taps\]=\(2, 2, 3\)"):
        norm_glu(x, w, conv_state=torch.zeros(2, 3, 3), conv_weight=torch.randn(2, 3))
    with pytest.raises(ValueError, match="tap-major"):
        norm_glu(x, w, conv_state=torch.zeros(2, 2, 3), conv_weight=torch.randn(2, 3), backend="triton")


@pytest.mark.parametrize("block_n,per_sm", [(1, 1), (2, 1), (4, 2)])
def test_programs_walk_many_blocks(block_n, per_sm):
    """Few programs each walking many blocks (the persistent loop and its one-block-ahead prefetch), blocks
    of one weight ending mid-program and the next weight's starting, the conv state's taps prefetched."""
    from based.ops.gemv.triton import triton_norm_glu, triton_norm_linear

    M, K = 2, 24
    x, nw = torch.randn(M, K), torch.randn(K)
    ws = [torch.randn(n, K) for n in (7, 5, 9)]
    res = torch.randn(M, 21)
    got = triton_norm_linear(x.to(DEVICE), [w.to(DEVICE) for w in ws], [None] * 3, nw.to(DEVICE), 1e-5,
                             res.to(DEVICE), block_n=block_n, per_sm=per_sm)
    torch.testing.assert_close(got.cpu(), norm_linear(x, ws, None, nw, 1e-5, res, backend="torch"))
    H = 11
    w, cw, cb = torch.randn(2 * H, K), torch.randn(H, 3), torch.randn(H)
    states = [conv_state_zeros(M, H, 3, device=d) for d in ("cpu", DEVICE)]
    for s in states:
        s.copy_(torch.arange(M * H * 3, dtype=torch.float32).view(M, H, 3))
    for _ in range(2):  # two steps: the second reads what the first shifted in
        got = triton_norm_glu(x.to(DEVICE), w.to(DEVICE), None, nw.to(DEVICE), 1e-5, states[1], cw.to(DEVICE),
                              cb.to(DEVICE), block_n=block_n, per_sm=per_sm)
        ref = norm_glu(x, w, None, nw, 1e-5, states[0], cw, cb, backend="torch")
        torch.testing.assert_close(got.cpu(), ref)
        torch.testing.assert_close(states[1].cpu(), states[0])


def _argmax_case(nan=False, M=3, K=32, N=80, n_valid=65, dtype=torch.float32):
    """x and W whose logits have their largest value twice in row 0 (a tie: the lower column, 20, wins) and a
    larger one in a padding column past n_valid (never chosen); with nan, column 7 is NaN in every row (NaN
    counts as the largest: 7 everywhere)."""
    x, w = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype) / K**0.5
    w[n_valid + 5] = 50 * x[0] / x[0].norm()
    w[50] = w[20] = 10 * x[0] / x[0].norm()
    if nan:
        w[7, 0] = float("nan")
    return x, w


@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_n,per_sm", [(None, None), (2, 1), (8, 2)])
def test_norm_linear_argmax_is_argmax_rows_of_the_logits(nan, dtype, block_n, per_sm):
    """The epilogue's choice equals argmax_rows over the rounded logits' real columns: ties to the lowest
    column, NaN largest, padding never; with one program or many walking several blocks each; and the
    positions in `advance` move on by exactly one."""
    from based.ops import argmax_rows
    from based.ops.gemv.triton import triton_norm_linear

    M, n_valid = 3, 65
    x, w = _argmax_case(nan, M, n_valid=n_valid, dtype=dtype)
    nw = torch.rand(x.shape[1], dtype=dtype) + 0.5
    logits = norm_linear(x, w, None, nw, 1e-5, backend="torch")
    expected = argmax_rows(logits[:, :n_valid], backend="torch")
    assert expected.tolist() == [7, 7, 7] if nan else expected[0] == 20  # the case is what it claims
    x_d, w_d, nw_d = x.to(DEVICE), w.to(DEVICE), nw.to(DEVICE)
    ids = torch.full((M,), -1, dtype=torch.long, device=DEVICE)
    advance = torch.tensor([5, 0, 9], device=DEVICE)
    log = torch.full((M, 4), -1, dtype=torch.long, device=DEVICE)
    got = triton_norm_linear(x_d, (w_d,), (None,), nw_d, 1e-5, None, block_n=block_n, per_sm=per_sm,
                             argmax=(n_valid, ids, advance, log))
    tol = 1e-5 if dtype == torch.float32 else 5e-2  # bf16: the norm's and the output's roundings apart
    torch.testing.assert_close(got.cpu(), logits, equal_nan=True, rtol=tol, atol=tol)
    assert ids.cpu().tolist() == argmax_rows(got.cpu()[:, :n_valid], backend="torch").tolist()
    if dtype == torch.float32:
        assert ids.cpu().tolist() == expected.tolist()
    assert advance.cpu().tolist() == [6, 1, 10]
    # The log got each id at column position % 4 (positions 5, 0, 9 before the call), nothing else.
    first = ids.cpu().tolist()
    expected_log = [[-1, first[0], -1, -1], [first[1], -1, -1, -1], [-1, first[2], -1, -1]]
    assert log.cpu().tolist() == expected_log
    # Again: the tickets were left at zero for the next launch.
    triton_norm_linear(x_d, (w_d,), (None,), nw_d, 1e-5, None, block_n=block_n, per_sm=per_sm,
                       argmax=(n_valid, ids, advance, log))
    assert advance.cpu().tolist() == [7, 2, 11]
    assert log.cpu()[[0, 1, 2], [2, 1, 2]].tolist() == ids.cpu().tolist()  # positions 6, 1, 10 -> columns 2, 1, 2
    assert log.cpu()[1, 2] == -1 and log.cpu()[0, 1] == first[0]


def test_norm_linear_argmax_backends_agree_and_check_arguments():
    x, w = _argmax_case()
    logs = []
    for backend in ("torch", "triton"):
        advance = torch.tensor([0, 1, 5], dtype=torch.int32, device=DEVICE)
        log = torch.zeros(3, 2, dtype=torch.long, device=DEVICE)
        logits, ids = norm_linear_argmax(x.to(DEVICE), w.to(DEVICE), n_valid=65, advance=advance, log=log,
                                         backend=backend)
        assert ids.cpu()[0] == 20 and advance.cpu().tolist() == [1, 2, 6]
        assert logits.shape == (3, 80)
        assert log.cpu()[[0, 1, 2], [0, 1, 1]].tolist() == ids.cpu().tolist()
        logs.append(log.cpu())
    assert torch.equal(logs[0], logs[1])
    with pytest.raises(ValueError, match="log must be a torch.int64 tensor .* with advance"):
        norm_linear_argmax(x, w, log=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"n_valid must be in \[1, N=80\]"):
        norm_linear_argmax(x, w, n_valid=81)
    with pytest.raises(ValueError, match=r"out must be a torch.int64 tensor \[rows=3\]"):
        norm_linear_argmax(x, w, out=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"advance must be a torch.int64 or torch.int32 tensor"):
        norm_linear_argmax(x, w, advance=torch.zeros(3))
    with pytest.raises(ValueError, match="one weight"):
        norm_linear_argmax(x, [w, w])


def test_embedding_lookup_in_the_first_projection():
    """index: the input rows are looked up in a table x (from a strided index, as a view of input_ids), and
    gathered receives them; norm_linear and norm_glu's conv step, Triton against the PyTorch form."""
    V, K, H = 40, 24, 5
    table, nw = torch.randn(V, K), torch.randn(K)
    index = torch.tensor([[7, 0], [39, 0], [7, 0]])[:, 0]  # stride 2; a row twice
    w, cw, cb = torch.randn(2 * H, K), torch.randn(H, 3), torch.randn(H)
    res = torch.randn(3, 2 * H)
    for kind in ("linear", "conv"):
        outs = []
        for backend, device in (("torch", "cpu"), ("triton", DEVICE)):
            gathered = torch.full((3, K), float("nan"), device=device)
            args = (table.to(device), w.to(device), None, nw.to(device), 1e-5)
            if kind == "linear":
                y = norm_linear(*args, res.to(device), backend=backend, index=index.to(device), gathered=gathered)
            else:
                state = conv_state_zeros(3, H, 3, device=device)
                state.copy_(torch.arange(3 * H * 3, dtype=torch.float32).view(3, H, 3))
                y = norm_glu(*args, conv_state=state, conv_weight=cw.to(device), conv_bias=cb.to(device),
                             backend=backend, index=index.to(device), gathered=gathered)
            assert torch.equal(gathered.cpu(), table[index])
            outs.append(y.cpu())
        rows = table[index]
        if kind == "linear":
            expected = norm_linear(rows, w, None, nw, 1e-5, res, backend="torch")
        else:
            state = conv_state_zeros(3, H, 3)
            state.copy_(torch.arange(3 * H * 3, dtype=torch.float32).view(3, H, 3))
            expected = norm_glu(rows, w, None, nw, 1e-5, conv_state=state, conv_weight=cw, conv_bias=cb,
                                backend="torch")
        assert torch.equal(outs[0], expected)
        torch.testing.assert_close(outs[1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="index must be a torch.int64 tensor"):
        norm_linear(table, w, index=index.int())
    with pytest.raises(ValueError, match="gathered .* needs index"):
        norm_linear(table, w, gathered=torch.zeros(3, K))
    with pytest.raises(ValueError, match=r"gathered must be a contiguous torch.float32 tensor \[rows, K\]=\(3, 24\)"):
        norm_glu(table, w, index=index, gathered=torch.zeros(2, K))
    with pytest.raises(ValueError, match=r"residual must be \[rows, N\]=\(3, 10\)"):
        norm_linear(table, w, residual=torch.zeros(V, 2 * H), index=index)


def test_configs_may_cap_registers(monkeypatch):
    """A CONFIGS entry's fourth element caps the registers per thread (Triton's maxnreg) on the GPU; an
    explicit maxnreg wins; the interpreter gets no cap."""
    from based.ops.gemv import triton as G

    monkeypatch.setitem(G.CONFIGS, "conv", (None, 4, 3, 168))
    monkeypatch.setitem(G.CONFIGS, "linear", (None, 4, 8))
    monkeypatch.setattr(G, "interpreted", lambda: False)
    assert G._config("conv", 2048, torch.device("cpu"), None, None, None)[4].get("maxnreg") == 168
    assert G._config("conv", 2048, torch.device("cpu"), None, None, None, maxnreg=200)[4].get("maxnreg") == 200
    assert "maxnreg" not in G._config("linear", 2048, torch.device("cpu"), None, None, None)[4]
    monkeypatch.setattr(G, "interpreted", lambda: True)
    assert "maxnreg" not in G._config("conv", 2048, torch.device("cpu"), None, None, None)[4]
