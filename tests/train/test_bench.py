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
