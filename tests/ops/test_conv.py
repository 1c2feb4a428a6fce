import pytest
import torch

from based.ops import naive_short_conv, short_conv, short_conv_step


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
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\]"):
        short_conv(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="initial_state must be"):
        short_conv(torch.randn(1, 3, 4), torch.randn(4, 3), initial_state=torch.zeros(1, 4, 2))
