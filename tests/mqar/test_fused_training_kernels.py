"""The stacked MQAR step with every fused training kernel (short conv, norms, linear cross-entropy) against the
same step in PyTorch: losses and parameters of 2 steps of 2 stacked runs: a hybrid (BaseConv, residual LayerNorm),
Mamba-2 (conv + SiLU, gated RMSNorm, RMSNorm) and H3 (its shift conv of N taps), each with the loss's kernel.

On CUDA the kernels are taken by themselves; without CUDA they are forced here onto CPU tensors and run by
Triton's interpreter, so the models' real calls under vmap(grad) reach the kernels on every machine."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from based.mqar import MQARRun, MQARTask  # noqa: E402
from based.mqar.stacked import StackedTrainer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(train=(MQARTask(12, 2, 8),), test=(MQARTask(12, 2, 4),), vocab_size=32, epochs=1, batch_size=4,
            warmup_frac=0.3)
SWITCHES = ("BASED_CONV_FUSED", "BASED_NORM_FUSED", "BASED_CE_FUSED")


def _force(monkeypatch, on: bool) -> dict:
    """The three kernels on (on CPU: through the interpreter) or off; their calls counted."""
    import based.ops.common as common
    import based.ops.conv as conv
    import based.ops.cross_entropy as ce
    import based.ops.norm as norm

    calls = {"conv": 0, "norm": 0, "ce": 0}
    for name in SWITCHES:
        monkeypatch.setenv(name, "1" if on else "0")

    def taken(x, kernel, initial_state, output_final_state, switch):
        use = (kernel is not None and initial_state is None and not output_final_state
               and os.environ.get(switch, "1") != "0")  # fused_training_call without its CUDA condition
        if use:
            calls[{"BASED_CONV_FUSED": "conv", "BASED_NORM_FUSED": "norm", "BASED_CE_FUSED": "ce"}[switch]] += 1
        return use

    for module in (conv, norm, ce):
        monkeypatch.setattr(module, "fused_training_call", taken if on and DEVICE == "cpu" else (
            lambda *a, f=common.fused_training_call: (lambda r: r)(f(*a))))
    return calls


def _train(mixer, d, kwargs):
    runs = [MQARRun(mixer, d, lr, kwargs, **TINY) for lr in (1e-3, 1e-2)]
    trainer = StackedTrainer(runs, DEVICE)
    losses = []
    for _ in range(2):
        trainer.step()
        losses.append(trainer.losses.clone())
    return torch.stack(losses), trainer.flat.clone()


@pytest.mark.parametrize("mixer, d, kwargs", [("attention", 16, {}), ("h3", 16, {}),
                                              ("mamba2", 16, {"ssm_state_size": 4, "mamba2_headdim": 8})])
def test_fused_step_equals_the_pytorch_step(mixer, d, kwargs, monkeypatch):
    _force(monkeypatch, False)
    want_losses, want_params = _train(mixer, d, kwargs)
    calls = _force(monkeypatch, True)
    got_losses, got_params = _train(mixer, d, kwargs)
    if DEVICE == "cpu":
        assert calls["conv"] and calls["norm"] and calls["ce"], calls
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_params, want_params, rtol=1e-4, atol=1e-5)
