"""Folding torch.func.vmap's runs into a dim a kernel already walks, so that k stacked runs cost one launch.

The vmap rule of an autograd.Function gets each input with its vmapped dim of k runs at in_dims[i], or None
where all runs share the input. The fused kernels know nothing of runs: they are merged into a dim the kernel
loops over anyway (the batch, R, the channels), and the outputs are split back after, as views:

    x [.., N, ..] --runs_at--> [.., k, N, ..] --fold_runs--> [.., k N, ..] --kernel, unfold_runs--> [.., k, N, ..]

None passes through runs_at and fold_runs (an optional input, such as an initial state).
"""
from __future__ import annotations

import torch


def runs_at(x: torch.Tensor | None, in_dim: int | None, k: int, at: int = 0) -> torch.Tensor | None:
    """x with its dim of k runs at position `at`.

    Args:
        in_dim: where vmap put the runs in x; None: x is shared, expanded to k runs as a stride-0 view (no copy).
    """
    if x is None:
        return None
    if in_dim is None:
        return x.unsqueeze(at).expand(*x.shape[:at], k, *x.shape[at:])
    return x.movedim(in_dim, at)


def fold_runs(
    x: torch.Tensor | None, in_dim: int | None, k: int, at: int = 0, contiguous: bool = False
) -> torch.Tensor | None:
    """The k runs (see runs_at) merged into the dim after them: [.., k, N, ..] -> [.., k N, ..].

    A view where the two dims merge without a copy (always where N is 1), else a copy; contiguous=True for
    kernels that take only contiguous tensors.
    """
    x = runs_at(x, in_dim, k, at)
    if x is None:
        return None
    x = x.flatten(at, at + 1)
    return x.contiguous() if contiguous else x


def unfold_runs(x: torch.Tensor, k: int, at: int = 0) -> torch.Tensor:
    """The inverse of fold_runs, a view: dim `at` of k N split into (k runs, N)."""
    return x.unflatten(at, (k, x.shape[at] // k))


class KernelBackward(torch.autograd.Function):
    """Base of a fused op's backward kernels as an autograd.Function of their own, so that vmap(grad(...))
    batches them too (through the subclass's vmap rule). Subclasses define forward (the kernels) and vmap;
    there is no double backward."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("a fused kernel's backward has no backward of its own (no double backward)")


__all__ = ["runs_at", "fold_runs", "unfold_runs", "KernelBackward"]
