"""Pieces of the trainer: FLOP counts, weight-decay groups, LR schedule, checkpoint files, metrics."""
import json
import math
from pathlib import Path

import pytest
import torch

from based import BasedConfig, BasedForCausalLM
from based.train.checkpoint import clean_partial, list_checkpoints, save_checkpoint
from based.train.config import TrainConfig
from based.train.distributed import DistInfo
from based.train.flops import flops_per_token, mixer_flops_per_token, peak_flops
from based.train.metrics import MetricsLog, read_metrics
from based.train.trainer import lr_schedule, no_weight_decay_names, param_groups


def test_flops_per_token_terms():
    T = 2048
    tf = BasedConfig.from_preset("transformer-360m")
    assert mixer_flops_per_token(tf, T) == tf.n_layer * 12 * tf.d_model * (T + 1) / 2  # causal: half the scores
    based = BasedConfig.from_preset("360m")
    # A window as long as the sequence costs what full attention does.
    wide = BasedConfig.from_preset("debug", mixer_types=["sliding_window"] * 4, window_size=64)
    full = BasedConfig.from_preset("debug", mixer_types=["attention"] * 4)
    assert mixer_flops_per_token(wide, 64) == pytest.approx(mixer_flops_per_token(full, 64))
    # 360m: 5 linear-attention layers (16 heads, 153 features, head_dim 64), 5 windows of 128, 17 convs.
    expected = (5 * 12 * 16 * 153 * 65 + 5 * 12 * 1024 * (128 * 129 / 2 + (T - 128) * 128) / T
                + 17 * 6 * 3 * 2 * 1024)
    assert mixer_flops_per_token(based, T) == pytest.approx(expected)
    assert flops_per_token(based, T, 100) == 600 + mixer_flops_per_token(based, T)
    assert peak_flops(torch.device("cpu")) is None
    # The state-update families: 12 x (state values per layer) per token.
    for preset, per_layer in (("rwkv-360m", 12 * 1024 * 64), ("lightning-360m", 12 * 1024 * 64),
                              ("mamba2-360m", 12 * 2048 * 128)):
        cfg = BasedConfig.from_preset(preset)
        assert mixer_flops_per_token(cfg, T) == cfg.n_layer * per_layer, preset


def test_weight_decay_only_on_matrices():
    model = BasedForCausalLM(BasedConfig.from_preset("debug"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert "transformer.embeddings.word_embeddings.weight" in exempt  # and with it the tied LM head
    assert all(n.endswith(".bias") or "norm" in n or "ln_f" in n or "embeddings" in n for n in exempt)
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert "transformer.layers.0.mixer.in_proj.weight" in decayed and "transformer.ln_f.weight" in exempt
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_lr_schedule_warmup_then_cosine():
    f = lr_schedule(warmup=10, max_steps=110, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0 and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 200)) and f(500) == pytest.approx(0.1)


def test_defaults_depend_on_the_preset():
    small = TrainConfig(out="x").resolved()
    assert (small.preset, small.seq_len, small.max_steps) == ("debug", 256, 300)
    big = TrainConfig(out="x", preset="360m").resolved()
    assert (big.seq_len, big.lr, big.warmup) == (2048, 8e-4, 200)
    assert TrainConfig(out="x", seq_len=64).resolved().seq_len == 64
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(out="x", preset="debug", config="c.json").resolved()
    with pytest.raises(ValueError, match="stop_at"):
        TrainConfig(out="x", stop_at=1000).resolved()


def test_only_rank_0_writes_checkpoints(tmp_path):
    model = BasedForCausalLM(BasedConfig.from_preset("debug"))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = (model, opt, sched, model.config, None, {"samples_seen": 0})
    save_checkpoint(tmp_path, 1, *args, DistInfo(rank=1, world_size=2), keep=2)
    assert not (tmp_path / "checkpoints").exists()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, *args, DistInfo(), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    assert sorted(f.name for f in list_checkpoints(tmp_path)[-1].iterdir()) == [
        "config.json", "model.safetensors", "modeling_based.py", "trainer.pt"]
    loaded = BasedForCausalLM.from_pretrained(list_checkpoints(tmp_path)[-1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_a_kill_mid_write_leaves_no_checkpoint(tmp_path):
    # What a SIGKILL during save leaves: a temporary folder, never a step-N folder.
    partial = tmp_path / "checkpoints" / ".tmp-step-0000005"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    assert list_checkpoints(tmp_path) == []
    clean_partial(tmp_path)
    assert not partial.exists()


def test_a_kill_mid_pruning_leaves_only_complete_checkpoints(tmp_path, small_tokenizer, monkeypatch):
    import based.train.checkpoint as checkpoint
    from based.data.tokenizer import load_tokenizer

    model = BasedForCausalLM(BasedConfig.from_preset("debug", vocab_size=512))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = (model, opt, sched, model.config, load_tokenizer(small_tokenizer), {"samples_seen": 0})
    for step in (1, 2):
        save_checkpoint(tmp_path, step, *args, DistInfo(), keep=2)
    complete = sorted(f.name for f in list_checkpoints(tmp_path)[0].iterdir())
    assert "tokenizer.json" in complete

    def killed_midway(path, ignore_errors=False):  # deletes one file, then the process is gone
        if Path(path).exists():
            (Path(path) / "tokenizer.json").unlink()
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, *args, DistInfo(), keep=2)  # pruning step 1 is cut short
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    for ckpt in list_checkpoints(tmp_path):
        assert sorted(f.name for f in ckpt.iterdir()) == complete, ckpt
    clean_partial(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def test_metrics_resume_drops_rows_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 4, "val_loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # cut by a kill
    assert len(read_metrics(path)) == 6
    log = MetricsLog(path, resume_step=3)
    log.write({"step": 4, "loss": math.pi})
    log.close()
    assert read_metrics(path) == rows[:3] + [{"step": 4, "loss": math.pi}]


@pytest.mark.parametrize("preset, exempt_names", [
    ("mamba2-debug", ("A_log", "dt_bias", ".D")),
    ("rwkv-debug", ("time_decay", "time_first")),
])
def test_ssm_dynamics_get_no_weight_decay(preset, exempt_names):
    model = BasedForCausalLM(BasedConfig.from_preset(preset))
    _, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    for part in exempt_names:
        assert any(n.endswith(part) for n in exempt), (part, sorted(exempt))
    mamba = BasedForCausalLM(BasedConfig.from_preset("debug", mixer_types=["mamba"] * 4))
    _, no_decay = param_groups(mamba, 0.1)
    assert any(p is mamba.transformer.layers[0].mixer.A_log for p in no_decay["params"])  # 2-D, still exempt
    # FSDP2 replaces the parameters and drops the mark: the names read before wrapping still exempt them.
    exempt = no_weight_decay_names(mamba)
    for p in mamba.parameters():
        p.__dict__.pop("_no_weight_decay", None)
    wrapped = torch.nn.Module()
    wrapped.module = mamba  # DDP's naming: "module." + the model's names
    _, no_decay = param_groups(wrapped, 0.1, exempt)
    assert any(p is mamba.transformer.layers[0].mixer.A_log for p in no_decay["params"])
    _, no_decay = param_groups(wrapped, 0.1)
    assert not any(p is mamba.transformer.layers[0].mixer.A_log for p in no_decay["params"])  # mark gone


@pytest.mark.parametrize("preset, small", [("debug", True), ("rwkv-debug", True), ("mamba2-hybrid-debug", True),
                                           ("360m", False), ("lightning-1.3b", False)])
def test_every_debug_preset_trains_small_by_default(preset, small, tmp_path):
    from based.train.config import SMALL_DEFAULTS, TrainConfig

    cfg = TrainConfig(out=tmp_path, preset=preset).resolved()
    assert (cfg.seq_len == SMALL_DEFAULTS["seq_len"]) == small


@pytest.mark.parametrize("field, value, message", [
    ("lr", math.inf, "lr must be positive and finite, got inf"),
    ("grad_clip", -1.0, r"grad_clip must be > 0 \(inf: no clipping\), got -1.0"),
    ("grad_clip", 0.0, "grad_clip must be > 0"),
    ("grad_clip", math.nan, "grad_clip must be > 0"),
    ("weight_decay", -0.1, "weight_decay must be >= 0 and finite, got -0.1"),
    ("min_lr_ratio", -1.0, r"min_lr_ratio must be in \[0, 1\]"),
    ("min_lr_ratio", 5.0, r"min_lr_ratio must be in \[0, 1\]"),
    ("beta2", 1.0, r"beta2 must be in \[0, 1\), got 1.0"),
    # Before: numpy's "Seed must be between 0 and 2**32 - 1" / "Overflow when unpacking long long", no flag named.
    ("seed", -1, r"seed must be an int in 0 \.\. 2\*\*32 - 1 \(numpy's range\), got -1"),
    ("seed", 2**70, "seed must be an int in 0 .. 2"),
])
def test_optimizer_settings_out_of_range_are_refused(field, value, message):
    # Before: --grad-clip -1 reversed every update, --weight-decay -1 and --min-lr-ratio -1 trained on
    # (exit 0), and --lr inf failed only at the first step with a NaN loss.
    with pytest.raises(ValueError, match=message):
        TrainConfig(out="x", **{field: value}).resolved()
    assert TrainConfig(out="x", grad_clip=math.inf, weight_decay=0.0, min_lr_ratio=1.0).resolved().grad_clip == math.inf


def test_the_final_sample_fits_a_full_attention_models_positions(small_tokenizer):
    # Before: a --sample-prompt longer than max_position_embeddings - 48 failed the finished run (exit 1)
    # with "prompt + max_new_tokens ... exceeds this model's max_position_embeddings".
    from based.data.tokenizer import load_tokenizer
    from based.train.trainer import greedy_sample

    tok = load_tokenizer(small_tokenizer)
    torch.manual_seed(0)
    model = BasedForCausalLM(BasedConfig.from_preset("transformer-debug", vocab_size=len(tok),
                                                     max_position_embeddings=32)).eval()
    prompt = "the number of items in the container " * 10
    assert len(tok(prompt).input_ids) > 32
    sample = greedy_sample(model, tok, prompt, 48)
    assert sample.startswith(prompt)
    short = greedy_sample(model, tok, "Return the", 8)
    assert short == greedy_sample(model, tok, "Return the", 8) and short.startswith("Return the")


def test_a_moved_run_folder_is_not_a_changed_setting():
    # Before: resuming a run copied or moved to another path printed and recorded "out 'R2' -> 'R3'".
    from dataclasses import asdict

    from based.train.trainer import settings_changed

    saved = asdict(TrainConfig(out="runs/a").resolved())
    assert settings_changed(saved, TrainConfig(out="/elsewhere/b").resolved()) == {}
    assert settings_changed(saved, TrainConfig(out="runs/a", seed=3).resolved()) == {"seed": [0, 3]}
