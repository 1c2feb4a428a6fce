import json

from based.cli import main


def test_bench_train_runs_both_models_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--size", "debug", "--device", "cpu", "--seq-len", "32", "--batch-size", "2",
                 "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["preset"] for r in result["results"]] == ["transformer-debug", "debug"]
    for row in result["results"]:
        assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no known peak on the CPU
        assert row["flops_per_token"] > 6 * row["parameters"]
    assert result["based_over_transformer_tokens_per_s"] > 0 and "BASED / Transformer++" in capsys.readouterr().out


def test_bench_train_more_presets(tmp_path, capsys):
    out = tmp_path / "bench.json"
    extra = ["rwkv-debug", "lightning-debug", "mamba2-debug", "mamba2-hybrid-debug"]
    assert main(["bench", "train", "--size", "debug", "--device", "cpu", "--seq-len", "32", "--batch-size", "2",
                 "--steps", "1", "--warmup", "1", "--presets", *extra, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["preset"] for r in result["results"]] == ["transformer-debug", "debug", *extra]
    for row in result["results"][2:]:
        assert row["tokens_per_s"] > 0 and row["mixer_flops_per_token"] > 0  # the state work is credited
        assert result[f"based_over_{row['preset']}_tokens_per_s"] > 0
    assert "BASED / mamba2-debug" in capsys.readouterr().out


def test_bench_train_rejects_unknown_presets(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "train", "--device", "cpu", "--presets", "rwkv-7b"])
    assert "unknown preset(s) ['rwkv-7b']" in capsys.readouterr().err


def test_bench_train_compiled_on_cpu(tmp_path, monkeypatch):
    import based.train.distributed as distributed

    monkeypatch.setattr(distributed, "COMPILE_BACKEND", "aot_eager")  # the wiring, without Inductor's build
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--size", "debug", "--device", "cpu", "--seq-len", "32", "--batch-size", "2",
                 "--steps", "1", "--warmup", "1", "--compile", "--out", str(out)]) == 0
    for row in json.loads(out.read_text())["results"]:
        assert row["compile"] and row["graphs"] >= 2  # a block type or more, and the loss
        assert row["graph_breaks"] == 0  # on the CPU: no Triton op, no FlexAttention mask to run eagerly


def test_bench_train_refuses_bad_counts_and_lengths(capsys):
    import pytest

    for flag, value in (("--steps", "-1"), ("--steps", "0"), ("--batch-size", "0"), ("--warmup", "-2")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "train", "--size", "debug", "--device", "cpu", flag, value])
        assert e.value.code == 2 and f"{flag} must be at least" in capsys.readouterr().err
    # transformer-debug attends over at most max_position_embeddings=512 positions, as generation does.
    with pytest.raises(SystemExit):
        main(["bench", "train", "--size", "debug", "--device", "cpu", "--seq-len", "600", "--steps", "1"])
    assert "--seq-len 600 exceeds transformer-debug's max_position_embeddings=512" in capsys.readouterr().err


def test_bench_train_refuses_an_out_it_cannot_write_before_timing(tmp_path, capsys):
    # It trained and timed both models first, then failed writing (NotADirectoryError, IsADirectoryError).
    import pytest

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker / "bench.json", tmp_path):
        with pytest.raises(SystemExit) as e:
            main(["bench", "train", "--size", "debug", "--device", "cpu", "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {out} must be a JSON file's path" in err and "Traceback" not in err
