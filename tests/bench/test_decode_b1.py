"""benchmarks/decode_b1.py's wiring on the CPU: every variant runs, patches what it says and undoes it."""
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
SCRIPT = Path(__file__).parents[2] / "benchmarks/decode_b1.py"


def _module():
    spec = importlib.util.spec_from_file_location("decode_b1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_runs_and_is_undone(tmp_path):
    from based.layers import Attention, LinearAttention

    b1 = _module()
    before = (LinearAttention.step_attend, Attention.step_attend)
    out = tmp_path / "b1.json"
    result = b1.main(["--preset", "debug", "--device", "cpu", "--steps", "2", "--repeats", "1", "--prompt-len", "8",
                      "--out", str(out)])
    assert [r["variant"] for r in result["rows"]] == b1.VARIANTS
    assert all(r["best_ms"] > 0 for r in result["rows"]) and out.exists()
    assert (LinearAttention.step_attend, Attention.step_attend) == before


def test_stubbed_steps_change_the_step():
    """Inside a stubbed variant the mixers' steps return their input's v: different logits from the model's."""
    from based.bench.generate import build
    from based.generation import InferenceState, prefill

    b1 = _module()
    model = build("debug", torch.float32, "cpu")
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("as-is", "no-mixer-steps"):
        with torch.no_grad(), b1.variant(name, model.config.d_model):
            state = InferenceState.allocate(model, 1, max_seq_len=8)
            prefill(model, state, ids[:, :5])
            logits[name] = model.step(ids[:, 5], state.layers, state.seqlen_offset)
    assert not torch.allclose(logits["as-is"], logits["no-mixer-steps"])


def test_knobs_are_set_and_bad_ones_named(monkeypatch):
    decode = importlib.import_module("based.ops.taylor.triton.decode")
    monkeypatch.setattr(decode, "RESIDENT_WARPS", decode.RESIDENT_WARPS)  # restored after the test
    b1 = _module()
    assert b1.set_knobs(["based.ops.taylor.triton.decode.RESIDENT_WARPS=8"]) == {
        "based.ops.taylor.triton.decode.RESIDENT_WARPS": 8}
    assert decode.RESIDENT_WARPS == 8
    with pytest.raises(SystemExit, match="has no"):
        b1.set_knobs(["based.ops.taylor.triton.decode.NO_SUCH=1"])
    with pytest.raises(SystemExit, match="MODULE.NAME=VALUE"):
        b1.set_knobs(["RESIDENT_WARPS"])
