"""MQAR model, training, sweeps (resume, CLI) and the Pareto plot, at tiny scale."""

import numpy as np
import pytest
import torch

from based.cli import main
from based.mqar import (
    MQARModel, MQARRun, MQARTask, figure2_runs, figure2_short_runs, frontier, mqar_config, plot_pareto, quick_runs,
    read_results, run_sweep, train_mqar,
)
from based.mqar.sweeps import FIGURE2_LRS, FIGURE2_MODELS, FIGURE2_SHORT_MODELS
from based.mqar.train import query_positions


@pytest.mark.parametrize("seed", [0, 1])
def test_attention_learns_mqar(seed):
    """The sanity check of the whole pipeline: attention solves a small MQAR task (320 steps, ~4 s). In the
    earlier layout: figure 2's (N(0, 0.02) init) starts slower, 0.41 / 0.996 for seeds 0 / 1 at this budget
    (tests/mqar/test_model.py trains it on a larger one)."""
    run = MQARRun("attention", 32, 1e-2, train=(MQARTask(32, 4, 2048),), test=(MQARTask(32, 4, 256),),
                  vocab_size=48, epochs=10, batch_size=64, seed=seed, data_seed=seed, layout="conv_hybrid")
    row = train_mqar(run)
    assert row["accuracy"]["T32_kv4"] > 0.9, row


def test_model_layout():
    model = MQARModel(mqar_config("linear_attn", 48, 100, layout="conv_hybrid", feature_dim=8))
    assert [type(m).__name__ for m in model.mixers] == ["BaseConv", "LinearAttention"]
    assert model.mixers[0].kernel_size == 3 and model.mixers[1].num_heads == 1
    assert not any("mlp" in name or "position" in name for name, _ in model.named_parameters())
    assert model(torch.randint(0, 100, (2, 16))).shape == (2, 16, 100)
    assert model.state_size(64) == 48 * 45 + 45  # one head of 48, compact Taylor features of d = 8: 45


def test_figure2_sweep_settings():
    runs = figure2_runs()
    assert len(runs) == len(FIGURE2_MODELS) * 4 == 55 * 4
    assert sorted({r.lr for r in runs}) == pytest.approx(np.logspace(-3, -1.5, 4))
    r = runs[0]
    assert [(t.seq_len, t.num_kv_pairs, t.num_examples) for t in r.train] == [
        (64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000)]
    assert [(t.seq_len, t.num_kv_pairs) for t in r.test] == [
        (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]
    assert (r.vocab_size, r.batch_size, r.epochs, r.weight_decay) == (8192, 256, 32, 0.1)
    assert len({r.run_id for r in runs}) == len(runs)


def test_figure2_short_is_figure2_cut_down():
    """Figure 2's models, tasks and test sets; a quarter of the training examples, 6 epochs, the 2 middle lrs,
    every model at the first lr before any at the second (a time cap then cuts the second lr only)."""
    runs, full = figure2_short_runs(), figure2_runs()[0]
    assert len(runs) == 2 * len(FIGURE2_SHORT_MODELS) == 38
    assert all((m, d, kw) in FIGURE2_MODELS for m, d, kw in FIGURE2_SHORT_MODELS)
    assert {m for m, _, _ in FIGURE2_SHORT_MODELS} == {m for m, _, _ in FIGURE2_MODELS}
    assert [r.lr for r in runs] == [FIGURE2_LRS[2]] * 19 + [FIGURE2_LRS[1]] * 19
    r = runs[0]
    assert r.test == full.test and [t.num_examples for t in r.train] == [25_000, 5_000, 5_000, 5_000, 5_000]
    assert [(t.seq_len, t.num_kv_pairs) for t in r.train] == [(t.seq_len, t.num_kv_pairs) for t in full.train]
    assert (r.vocab_size, r.batch_size, r.epochs, r.weight_decay) == (8192, 256, 6, 0.1)
    assert len({r.run_id for r in runs}) == len(runs)


def test_query_positions():
    labels = torch.tensor([[-100, 5, -100, 7], [3, -100, -100, 4]])
    positions, values = query_positions(labels)
    assert positions.tolist() == [[1, 3], [0, 3]] and values.tolist() == [[5, 7], [3, 4]]
    with pytest.raises(ValueError, match="same number of query positions"):
        query_positions(torch.tensor([[-100, 5], [3, 4]]))


def test_sweep_time_limit_and_a_failing_run(tmp_path, capsys):
    tiny = dict(train=(MQARTask(16, 2, 32),), test=(MQARTask(16, 2, 8),), vocab_size=32, epochs=1, batch_size=16)
    runs = [MQARRun("no_such_mixer", 16, 1e-3, **tiny), MQARRun("attention", 16, 1e-3, **tiny)]
    assert run_sweep(runs, tmp_path, progress=False, time_limit=0) == []  # past the limit: nothing starts
    rows = run_sweep(runs, tmp_path, progress=False, time_limit=600)
    assert [r["mixer"] for r in rows] == ["attention"]  # the broken run is reported, the next one trained
    assert "no_such_mixer" in capsys.readouterr().err


def test_quick_sweep_covers_the_tradeoff():
    families = {(r.mixer, r.mixer_kwargs.get("feature_dim")) for r in quick_runs()}
    assert {"attention", "sliding_window", "mamba", "base_conv"} <= {m for m, _ in families}
    assert len({f for m, f in families if m == "linear_attn"}) >= 3  # BASED at several feature dims


def test_every_figure2_mixer_trains_and_the_sweep_resumes(tmp_path):
    runs = figure2_runs(scale=0.0005, epochs=1)
    first_of_each = list({r.mixer: r for r in reversed(runs)}.values())  # the smallest model of each mixer
    assert {r.mixer for r in first_of_each} == {"linear_attn", "attention", "sliding_window", "mamba", "hyena", "h3",
                                                     "rwkv", "lightning", "mamba2"}
    rows = run_sweep(first_of_each, tmp_path, limit=4, progress=False)
    assert len(rows) == 4 and (tmp_path / "pareto.png").stat().st_size > 10_000
    rows = run_sweep(first_of_each, tmp_path, progress=False)  # resumes: only the others are trained
    assert sorted(r["mixer"] for r in rows) == sorted(r.mixer for r in first_of_each)
    assert len(read_results(tmp_path / "results.jsonl")) == len(first_of_each)
    for row in rows:
        assert set(row["state_size"]) == {"64", "128", "256", "512", "1024"}
        assert set(row["accuracy"]) == {"T64_kv4", "T64_kv8", "T64_kv16", "T128_kv32", "T256_kv64", "T512_kv128",
                                        "T1024_kv256"}
        assert MQARRun.from_dict(row["run"]).run_id == row["run_id"]
    attn = next(r for r in rows if r["mixer"] == "attention")
    # Figure 2's layout counts every layer's state: the KV cache and the BaseConv's 3 d before it.
    assert attn["state_size"]["1024"] == 2 * attn["d_model"] * 1024 + 3 * attn["d_model"]


def test_cli_runs_and_resumes(tmp_path, capsys):
    args = ["mqar", "--sweep", "figure2", "--scale", "0.0005", "--epochs", "1", "--limit", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 0  # the next run, not the first again
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == 2 and rows[0]["run_id"] != rows[1]["run_id"]
    assert main(["mqar", "--quick", "--plot-only", "--out", str(tmp_path)]) == 0
    short = ["mqar", "--sweep", "figure2-short", "--scale", "0.002", "--epochs", "1", "--out", str(tmp_path)]
    assert main([*short, "--limit", "1", "--time-limit", "600"]) == 0
    assert len(read_results(tmp_path / "results.jsonl")) == 3
    with pytest.raises(SystemExit):
        main(["mqar", "--quick", "--jobs", "0", "--out", str(tmp_path)])


def test_frontier_and_plot(tmp_path):
    assert frontier([(10, 0.2), (5, 0.1), (20, 0.15), (40, 0.9), (40, 0.5)]) == [(5, 0.1), (10, 0.2), (40, 0.9)]
    test = [{"seq_len": 64, "num_kv_pairs": 8, "num_examples": 1}]
    rows = [
        {"mixer": m, "model": f"{m} {s}", "d_model": 64, "lr": lr, "hparams": hp,
         "state_size": {"64": s}, "accuracy": {"T64_kv8": acc}, "run": {"test": test}}
        for m, hp, s, acc, lr in [("attention", {}, 8192, 1.0, 1), ("linear_attn", {"feature_dim": 8}, 2000, 0.6, 1),
                                  ("linear_attn", {"feature_map": "relu"}, 300, 0.2, 1), ("mamba", {}, 512, 0.3, 1)]
    ]
    path = plot_pareto(rows, tmp_path / "p.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
