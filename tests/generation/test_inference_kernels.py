"""The Triton inference passes (short_conv's prefill pass, rotary, SwiGLU) inside real models: prefill into
scattered slots, a prompt prefilled in pieces and decode steps give the logits of the PyTorch path (fp32).

On CUDA they are taken by themselves; without CUDA they are forced here onto CPU tensors, run by Triton's
interpreter (tests/conftest.py), so the layers' real calls (strided q / k and gate views, tap-major states,
tensor positions) go through the kernels on every machine."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from based import BasedConfig, BasedForCausalLM  # noqa: E402
from based.generation import InferenceState, prefill  # noqa: E402
from based.generation.engine import prefill_chunk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESETS = ["debug", "transformer-debug", "mamba2-debug", "mamba2-hybrid-debug"]


def _force(monkeypatch, on: bool) -> dict:
    """Turn the three passes on (on CPU: through the interpreter) or off; count their calls."""
    import based.ops.conv as conv
    import based.ops.rotary as rotary
    import based.ops.swiglu as swiglu
    from based.ops.conv import fused as conv_fused
    from based.ops.rotary_triton import triton_apply_rotary
    from based.ops.swiglu_triton import triton_swiglu

    calls = {"conv": 0, "rotary": 0, "swiglu": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(conv, "fused_short_conv_inference", counted("conv", conv_fused.fused_short_conv_inference))
    monkeypatch.setattr("based.ops.rotary_triton.triton_apply_rotary", counted("rotary", triton_apply_rotary))
    monkeypatch.setattr("based.ops.swiglu_triton.triton_swiglu", counted("swiglu", triton_swiglu))
    for name in ("BASED_CONV_FUSED", "BASED_ROTARY_FUSED", "BASED_SWIGLU_FUSED"):
        monkeypatch.setenv(name, "1" if on else "0")
    if on and DEVICE == "cpu":
        def taken(x, switch, *tensors):  # fused_inference_call without its CUDA condition
            grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))
            return not (grads or torch._C._functorch.is_functorch_wrapped_tensor(x)
                        or os.environ.get(switch, "1") == "0")
        for module in (conv, rotary, swiglu):
            monkeypatch.setattr(module, "fused_inference_call", taken)
    return calls


@torch.no_grad()
def _run(name: str) -> list[torch.Tensor]:
    """Logits of: 3 prompts prefilled whole into scattered slots, one more prefilled in two pieces, then 4
    decode steps of all slots."""
    torch.manual_seed(0)
    model = BasedForCausalLM(BasedConfig.from_preset(name)).to(DEVICE).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (3, 21), generator=g).to(DEVICE)
    state = InferenceState.allocate(model, 6, max_seq_len=64, device=DEVICE)
    out = [prefill(model, state, ids, None, [4, 1, 3])]
    piece_state = model.allocate_inference_cache(1, state.dtype, state.device, state.max_seq_len)
    long = torch.randint(1, 256, (1, 30), generator=g).to(DEVICE)
    out.append(prefill_chunk(model, piece_state, long[:, :17], 0))
    out.append(prefill_chunk(model, piece_state, long[:, 17:], 17))
    state.put(torch.tensor([0], device=DEVICE), piece_state)
    state.seqlen_offset[0] = 30
    for _ in range(4):
        step_ids = torch.randint(1, 256, (6,), generator=g).to(DEVICE)
        out.append(model.step(step_ids, state.layers, state.seqlen_offset))
        state.seqlen_offset += 1
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_inference_passes_give_the_pytorch_logits(name, monkeypatch):
    _force(monkeypatch, False)
    want = _run(name)
    calls = _force(monkeypatch, True)
    got = _run(name)
    assert calls["swiglu"] > 0 and (calls["rotary"] > 0 or name == "mamba2-debug")
    assert calls["conv"] > 0 or name == "transformer-debug"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
