import pytest
import torch

from based.ops import conv_state_zeros, naive_short_conv, short_conv, short_conv_step


@pytest.mark.parametrize("T,K", [(1, 3), (63, 3), (500, 4), (2, 5)])
def test_matches_naive(T, K):
    x, w, b = torch.randn(2, T, 6), torch.randn(6, K), torch.randn(6)
    torch.testing.assert_close(short_conv(x, w, b)[0], naive_short_conv(x, w, b))


def test_causal():
    x, w = torch.randn(1, 20, 4), torch.randn(4, 3)
    y, _ = short_conv(x, w)
    x2 = x.clone()
    x2[:, 10:] += 1
    y2, _ = short_conv(x2, w)
    assert torch.equal(y[:, :10], y2[:, :10]) and not torch.allclose(y[:, 10:], y2[:, 10:])


@pytest.mark.parametrize("split", [1, 2, 7])
def test_state_continues_the_sequence(split):
    x, w, b = torch.randn(2, 12, 5), torch.randn(5, 3), torch.randn(5)
    y, state = short_conv(x, w, b, output_final_state=True)
    y1, s1 = short_conv(x[:, :split], w, b, output_final_state=True)
    y2, s2 = short_conv(x[:, split:], w, b, initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(s2, state)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


@pytest.mark.parametrize("with_state", [False, True])
def test_compiled_form_matches_conv1d(with_state):
    """Compiled code takes the shifted-sum form (which Inductor fuses); values and gradients are conv1d's."""
    x, w, b = torch.randn(2, 37, 6), torch.randn(6, 3), torch.randn(6)
    state = torch.randn(2, 6, 3) if with_state else None
    dy = torch.randn(2, 37, 6)

    def run(fn):
        xs = [t.clone().requires_grad_() for t in (x, w, b)]
        y, final = fn(*xs, initial_state=state, output_final_state=True)
        (y * dy).sum().backward()
        return [y, final] + [t.grad for t in xs]

    for got, want in zip(run(torch.compile(short_conv, backend="aot_eager")), run(short_conv)):
        torch.testing.assert_close(got, want)


def test_step_matches_full_conv():
    x, w, b = torch.randn(3, 9, 4), torch.randn(4, 3), torch.randn(4)
    y, _ = short_conv(x, w, b)
    state = torch.zeros(3, 4, 3)
    steps = torch.stack([short_conv_step(x[:, t], state, w, b) for t in range(9)], 1)
    torch.testing.assert_close(steps, y)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"weight must be \[C=4, K\]"):
        short_conv(torch.randn(1, 3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"K >= 1 taps"):
        short_conv(torch.randn(1, 3, 4), torch.randn(4, 0))
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\]"):
        short_conv(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="initial_state must be"):
        short_conv(torch.randn(1, 3, 4), torch.randn(4, 3), initial_state=torch.zeros(1, 4, 2))


def _conv_states(B, C, K):
    """The same zero state stored channel-major ([B, C, K] contiguous) and tap-major (conv_state_zeros)."""
    return {"channel-major": torch.zeros(B, C, K), "tap-major": conv_state_zeros(B, C, K)}


@pytest.mark.parametrize("layout", ["channel-major", "tap-major"])
@pytest.mark.parametrize("activation, gated", [(None, False), ("silu", False), ("silu", True)])
def test_step_matches_full_conv_in_either_layout(layout, activation, gated):
    torch.manual_seed(0)
    B, T, C, K = 3, 9, 4, 3
    x, w, b, g = torch.randn(B, T, C), torch.randn(C, K), torch.randn(C), torch.randn(B, T, C)
    y, final = short_conv(x, w, b, output_final_state=True)
    if activation == "silu":
        y = torch.nn.functional.silu(y)
    if gated:
        y = y * g
    state = _conv_states(B, C, K)[layout]
    steps = torch.stack(
        [short_conv_step(x[:, t], state, w, b, activation=activation, gate=g[:, t] if gated else None)
         for t in range(T)], 1,
    )
    torch.testing.assert_close(steps, y)
    torch.testing.assert_close(state, final)


def test_tap_major_state_stores_taps_as_rows():
    state = conv_state_zeros(2, 5, 3)
    assert state.shape == (2, 5, 3) and state.transpose(1, 2).is_contiguous()
    short_conv_step(torch.arange(10.0).view(2, 5), state, torch.ones(5, 3))
    assert torch.equal(state[..., -1], torch.arange(10.0).view(2, 5))  # newest last, as before


@pytest.mark.parametrize("K, C, B, dtype, rows", [
    (3, 40, 3, torch.float32, None), (4, 1100, 2, torch.bfloat16, None), (2, 8, 10, torch.float32, 4),
])
def test_triton_step_matches_torch(K, C, B, dtype, rows, monkeypatch):
    """The Triton pass (interpreted without CUDA): non-power-of-two channels, several channel blocks, the
    multi-row programs of large batches (rows=4: the last program has 2); x and gate as strided column
    slices of one projection."""
    pytest.importorskip("triton")
    torch.manual_seed(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, b = torch.randn(C, K, device=device), torch.randn(C, device=device)
    xg = torch.randn(B, 2 * C, device=device, dtype=dtype)
    x, g = xg.split(C, dim=-1)
    states = {backend: conv_state_zeros(B, C, K, dtype, device) for backend in ("torch", "triton")}
    start = torch.randn(B, C, K)
    if rows:
        from based.ops.conv import triton as conv_triton

        launch = conv_triton.triton_short_conv_step
        monkeypatch.setattr(conv_triton, "triton_short_conv_step", lambda *a: launch(*a, rows=rows))
    out = {}
    for backend, s in states.items():
        s.copy_(start)
        out[backend] = short_conv_step(x, s, w, b, activation="silu", gate=g, backend=backend)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out["triton"], out["torch"], **tol)
    assert torch.equal(states["triton"], states["torch"])  # the shift moves values, it does not round them
    for backend, s in states.items():  # no bias, no activation, no gate
        out[backend] = short_conv_step(x, s, w, None, backend=backend)
    torch.testing.assert_close(out["triton"], out["torch"], **tol)
    assert torch.equal(states["triton"], states["torch"])


def test_step_bad_arguments():
    state = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="activation must be"):
        short_conv_step(torch.zeros(1, 4), state, torch.ones(4, 3), activation="gelu")
    with pytest.raises(ValueError, match="tap-major conv_state"):
        short_conv_step(torch.zeros(1, 4), state, torch.ones(4, 3), backend="triton")
