"""`based bench generate` on the CPU (debug presets, fp32): the --presets engines, their state sizes, the
smoke test of their debug presets, the summary, and the time limit shared between engines."""
import json
from pathlib import Path

import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.bench.generate import LOG_LEN, Clock, fold_cycle, run_steps, state_traffic_bytes, summarize
from based.models.presets import debug_preset
from based.cli import main

MIXER_PRESETS = ["rwkv-debug", "lightning-debug", "mamba2-debug", "mamba2-hybrid-debug"]
RECORDED = Path(__file__).parents[2] / "benchmarks/results/archive/generation-h200-2026-11-28.json"
# A tiny run: prompt 16, room for 40 new tokens, batches 1 and 2, 20 timed steps per point (24, three whole
# fold cycles, for models whose linear attention writes its state every 8th step).
TINY = ["--device", "cpu", "--prompt-len", "16", "--new-tokens", "40", "--prefill-batch", "1",
        "--point-seconds", "0.01", "--headroom-gb", "0", "--batches", "1", "2"]


def test_presets_are_engines_with_state_sizes_and_smoke(tmp_path):
    out = tmp_path / "gen.json"
    assert main(["bench", "generate", *TINY, "--skip", "based", "transformer", "hf_llama",
                 "--presets", *MIXER_PRESETS, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["presets"] == MIXER_PRESETS and "based" not in result and "hf_llama" not in result
    # The smoke test covers each preset's family at debug size, beside BASED's and Transformer++'s.
    assert list(result["smoke"]) == ["debug", "transformer-debug", *MIXER_PRESETS]
    for checks in result["smoke"].values():
        assert checks["graph_equals_eager"] and checks["gpu_equals_cpu_greedy"]
        assert checks["teacher_forced_logits_rel_err"] < 1e-5 and checks["seeded_sampling_reproducible"]
    for preset in MIXER_PRESETS:
        engine = result[preset]
        with torch.device("meta"):
            model = BasedForCausalLM(BasedConfig.from_preset(preset))
        assert engine["state_bytes_per_sequence"] == model.inference_state_bytes(56, 1, torch.float32)
        assert engine["state_size"] == model.state_size(56)
        assert engine["state_traffic_bytes_per_sequence_step"] == state_traffic_bytes(model, 56, torch.float32)
        assert [r["batch"] for r in engine["rows"]] == [1, 2] and engine["skipped_batches"] == []
        steps = 24 if fold_cycle(model) == 8 else 20
        for row in engine["rows"]:
            assert row["steps_timed"] == steps and row["tokens_per_s"] > 0 and row["peak_memory_GiB"] is None
        best = max(r["tokens_per_s"] for r in engine["rows"])
        assert result["summary"][f"{preset}_best_tokens_per_s"] == best


def test_state_traffic_reads_and_writes_recurrent_states_reads_attention_caches():
    with torch.device("meta"):
        model = BasedForCausalLM(BasedConfig.from_preset("mamba2-hybrid-debug"))
    mixers = [block.mixer for block in model.transformer.layers]
    expected = sum((1 if type(m).__name__ == "Attention" else 2) * m.inference_state_bytes(64, 1) for m in mixers)
    assert state_traffic_bytes(model, 64, None) == expected
    assert {type(m).__name__ for m in mixers} == {"Attention", "Mamba2"}


def test_summary_of_the_recorded_default_run_is_unchanged():
    recorded = json.loads(RECORDED.read_text())
    assert summarize(recorded) == recorded["summary"]


def test_time_limit_is_shared_between_engines(tmp_path):
    parent = Clock(100.0)
    share = parent.share(4, reserve_s=20.0)
    assert 39.0 < share.left() <= 40.0  # 20 s reserve + (100 - 20) / 4
    assert Clock(30.0).share(1, reserve_s=20.0).left() <= 30.0
    parent.limit = 0.0
    assert share.left() <= 0.0  # the parent's limit still holds
    # Out of time before an engine starts: it is recorded as skipped without building the model.
    out = tmp_path / "gen.json"
    assert main(["bench", "generate", *TINY, "--skip", "smoke", "based", "transformer", "hf_llama",
                 "--presets", "rwkv-debug", "--time-limit", "0", "--out", str(out)]) == 0
    engine = json.loads(out.read_text())["rwkv-debug"]
    assert engine["rows"] == [] and "time limit" in engine["skipped"]


def test_preset_names_and_debug_sizes():
    assert [debug_preset(p) for p in ("1.3b", "transformer-360m", "rwkv-1.3b", "mamba2-hybrid-1.3b")] == [
        "debug", "transformer-debug", "rwkv-debug", "mamba2-hybrid-debug"]
    with pytest.raises(SystemExit):
        main(["bench", "generate", "--device", "cpu", "--presets", "rwkv-7b"])


def test_growing_caches_are_timed_mid_generation(tmp_path):
    """A full-attention step reads every cached row, so its engine is timed around the middle of the new
    tokens (the average cost) and its roofline counts the rows cached there; BASED's fixed state is
    timed right after the prompt."""
    out = tmp_path / "gen.json"
    assert main(["bench", "generate", *TINY, "--skip", "smoke", "based", "transformer", "hf_llama",
                 "--presets", "debug", "transformer-debug", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for preset, first, steps in (("debug", 16 + 8, 24), ("transformer-debug", 16 + 40 // 2 - 20 // 2, 20)):
        engine = result[preset]
        with torch.device("meta"):
            model = BasedForCausalLM(BasedConfig.from_preset(preset))
        middle = first + steps // 2
        for row in engine["rows"]:
            assert row["steps_timed"] == steps and row["first_timed_position"] == first
            assert row["bytes_per_step"] == engine["weights_bytes"] + row["batch"] * state_traffic_bytes(
                model, middle if preset.startswith("transformer") else 56, torch.float32)


@torch.no_grad()
def test_run_steps_takes_every_steps_token_from_the_log():
    """The benchmark's steps read their tokens from the decoder's log in blocks: the same tokens as copying
    each step's, across block edges and a partial last block."""
    from based.generation import Decoder

    model = BasedForCausalLM(BasedConfig.from_preset("debug")).eval()
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    n = LOG_LEN + 5
    tokens = []
    for logged in (False, True):
        decoder = Decoder(model, 2, log_len=LOG_LEN if logged else 0)
        decoder.add(prompt)
        if logged:
            out = torch.full((2, n + 3), -1, dtype=torch.long)
            run_steps(decoder, out, 0, 3)
            run_steps(decoder, out, 3, n + 3)
            tokens.append(out)
        else:
            tokens.append(torch.stack([decoder.step().clone() for _ in range(n + 3)], 1))
    assert torch.equal(tokens[1], tokens[0])
