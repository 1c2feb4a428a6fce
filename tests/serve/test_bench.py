"""based.bench.serve: its client against the shared server, its summary and plot; the whole run (slow)."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

pytest.importorskip("aiohttp")

from based.bench.serve import main, plot, run_load, summarize, workload  # noqa: E402


def test_client_counts_tokens_latencies_and_server_cpu(server):
    prompts, lengths = workload(6, 20, (3, 9), seed=0)
    assert [len(p) for p in prompts] == [20] * 6 and all(3 <= n <= 9 for n in lengths)
    stream = asyncio.run(run_load(server.url, prompts, lengths, float("inf"), True, seed=0))
    assert stream["completed"] == 6 and stream["failed"] == 0
    assert stream["output_tokens"] == sum(lengths)  # ignore_eos: every request its full length
    assert stream["ttft_ms_p50"] > 0 and stream["itl_ms_p99"] >= stream["itl_ms_p50"] > 0
    assert stream["tpot_ms_p99"] >= stream["tpot_ms_p50"] > 0
    assert stream["server_cpu_ms_per_token"] > 0 and stream["engine_thread_cpu_ms_per_token"] > 0
    plain = asyncio.run(run_load(server.url, prompts, lengths, 50.0, False, seed=1))
    assert plain["output_tokens"] == sum(lengths) and plain["itl_ms_p50"] is None
    assert stream["client_processes"] == 1 and 0 < stream["client_cpu_fraction"] <= 1.5


def test_client_processes_share_the_requests(server):
    prompts, lengths = workload(7, 20, (3, 9), seed=2)
    run = asyncio.run(run_load(server.url, prompts, lengths, 40.0, True, seed=2, clients=2))
    assert run["client_processes"] == 2 and run["completed"] == 7 and run["failed"] == 0
    assert run["output_tokens"] == sum(lengths) and run["itl_ms_p99"] >= run["itl_ms_p50"] > 0
    assert run["duration_s"] > 0 and run["client_cpu_fraction"] > 0
    few = asyncio.run(run_load(server.url, prompts[:1], lengths[:1], float("inf"), True, seed=3, clients=2))
    assert few["client_processes"] == 1 and few["completed"] == 1  # no client process without requests


@pytest.mark.parametrize("clients", ["0", "-1", "100000"])
def test_client_count_out_of_range_is_refused(clients, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cpu", "--clients", clients])
    assert exit_.value.code == 2 and "--clients must be 1 .. " in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--rates", "-1"], "--rates must be > 0 and finite, got -1.0"),
    (["--rate-fractions", "nan"], "--rate-fractions must be > 0 and finite"),
    (["--duration", "0"], "--duration must be > 0"),
    (["--saturation-prompts", "-1"], "--saturation-prompts must be >= 1"),
    (["--time-limit", "nan"], "--time-limit must be >= 0 and finite"),
    (["--max-slots", "0"], "--max-slots must be >= 1"),  # --quick used to replace the 0 by 4
    (["--out", "{tmp}"], "must be a JSON file's path"),
    (["--out", "{tmp}/file/x.json"], "must be a JSON file's path"),
    (["--log-dir", "{tmp}/file"], "--log-dir .*file is an existing file"),
    (["--out", "{tmp}/garbage.json", "--append"], "--append: --out .*garbage.json is not readable JSON"),
    # Before: the client made every prompt first, and 4e9 of them filled the memory.
    (["--saturation-factor", "1e9", "--max-slots", "4"], r"--saturation-factor 1e\+09 x --max-slots 4 makes a run "
                                                         r"of 4000000000 requests, more than 100,000: lower it"),
    (["--saturation-prompts", "1000000"], "--saturation-prompts makes a run of 1000000 requests"),
    (["--rates", "1e6", "--duration", "10"], r"--rates 1e\+06 x --duration 10 makes a run of 10000000 requests"),
])
def test_meaningless_settings_are_refused_before_any_server(flags, message, tmp_path, capsys):
    # Before: each ran (recording a rate of -1, an empty saturation run), or ended in a traceback after the runs.
    (tmp_path / "file").write_text("x")
    (tmp_path / "garbage.json").write_text("garbage{")
    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cpu", "--presets", "debug", "--quick", *[f.replace("{tmp}", str(tmp_path)) for f in flags]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and re.search(message, err[-1]), err
    assert (tmp_path / "garbage.json").read_text() == "garbage{"


def _run(rate, stream, tps, itl99, rps=10.0):
    return {"rate": rate, "stream": stream, "output_tokens_per_s": tps, "requests_per_s": rps, "itl_ms_p99": itl99,
            "ttft_ms_p50": 100.0, "steady_tokens_per_s_all_slots_busy": None}


def test_summary_reads_the_targets(tmp_path):
    result = {"date": "2026-12-07", "gpu": "H100",
              "based": {"slots": 8, "offline": {"tokens_per_s": 1000.0},
                        "runs": [_run("inf", True, 800, 150), _run(5.0, True, 600, 90), _run(2.5, True, 300, 40),
                                 _run("inf", False, 950, None)]},
              "transformer": {"slots": 4, "offline": {"tokens_per_s": 300.0},
                              "runs": [_run("inf", True, 250, 120), _run(1.0, True, 100, 80)]}}
    s = summarize(result)
    assert "based_over_transformer_steady_all_slots_busy" not in s  # BASED's saturation is past 100 ms
    assert s["based_stream_over_offline"] == 0.8 and s["based_plain_over_offline"] == 0.95
    assert "based_bound_over_offline" not in s  # no prefill rate measured: no bound claimed
    # 500-token prompts at 4,000 tokens/s (0.125 s a request) and 250-token answers at 1,000 (0.25 s): 2/3.
    result["config"] = {"prompt_len": 500, "output_len": [100, 400]}
    result["based"]["offline"]["prefill_tokens_per_s"] = 4000.0
    assert summarize(result)["based_bound_over_offline"] == pytest.approx(2 / 3)
    assert s["based_best_tokens_per_s_at_p99_itl_le_100ms"] == 600
    assert s["based_over_transformer_at_p99_itl_le_100ms"] == 6.0
    assert s["based_rate_near_half_saturation"] == 5.0
    assert plot(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_summary_gives_the_steady_ratio_where_both_saturate_within_100ms():
    """Both saturation runs within p99 ITL 100 ms: beside the whole-run ratio, the ratio of their rates with every
    slot busy (a short run's drain does not count there)."""
    sat_b, sat_t = _run("inf", True, 3000, 90), _run("inf", True, 600, 60)
    sat_b["steady_tokens_per_s_all_slots_busy"], sat_t["steady_tokens_per_s_all_slots_busy"] = 2900.0, 800.0
    s = summarize({"based": {"slots": 8, "runs": [sat_b]}, "transformer": {"slots": 4, "runs": [sat_t]}})
    assert s["based_over_transformer_at_p99_itl_le_100ms"] == 5.0
    assert s["based_over_transformer_steady_all_slots_busy"] == 2900 / 800


@pytest.mark.slow
def test_bench_serve_quick_on_cpu(tmp_path):
    out = tmp_path / "serve.json"
    assert main(["--device", "cpu", "--presets", "debug", "--quick", "--out", str(out), "--git-rev", "abc",
                 "--gpu", "none"]) == 0
    result = json.loads(out.read_text())
    assert result["git_revision"] == "abc" and result["gpu"] == "none"
    runs = result["debug"]["runs"]
    assert len(runs) == 4 and all(r["failed"] == 0 for r in runs)
    assert result["debug"]["offline"]["tokens_per_s"] > 0 and out.with_suffix(".png").exists()
    assert result["debug"]["offline"]["prefill_tokens_per_s"] > 0 and 0 < result["summary"]["debug_bound_over_offline"] < 1


def test_null_engine_runs_the_servers_own_loop_without_a_model():
    """The null engine (--null-engine): every sequence gets max_tokens of NULL_TOKEN's text and its finish,
    through the real scheduler; a paced step waits as a GPU step would."""
    import time

    from based import BasedConfig, BasedForCausalLM
    from based.bench.serve import NULL_TOKEN, null_scheduler
    from based.serve.scheduler import Sequence
    from based.serve.text import ByteTokenizer

    for step_s in (0.0, 0.02):
        model = BasedForCausalLM(BasedConfig.from_preset("debug")).eval()
        got = {}
        scheduler = null_scheduler(step_s)(model, ByteTokenizer(), 4, 16, 64, max_seq_len=64,
                                           post=lambda items: [got.setdefault(s, []).append(o) for s, o in items])
        seqs = [Sequence(prompt=[65] * 30, max_tokens=n, deliver=None, ignore_eos=True) for n in (3, 7, 5, 9, 2, 6)]
        scheduler.waiting.extend(seqs)
        start = time.perf_counter()
        while not all(s.done for s in seqs):
            scheduler._pass()
        elapsed = time.perf_counter() - start
        for s in seqs:
            assert "".join(o.text for o in got[s]) == chr(NULL_TOKEN) * s.max_tokens
            assert got[s][-1].finish_reason == "length" and got[s][-1].completion_tokens == s.max_tokens
        assert len(scheduler.free) == 4 and not scheduler.running
        if step_s:  # 6 sequences on 4 slots: at least 9 + 2 decode steps one after the other
            assert elapsed >= 10 * step_s


def test_engine_only_times_the_engine_without_servers(tmp_path, monkeypatch, capsys):
    """--engine-only: the offline engine (decode and prefill rates) and the saturation workload through the
    Scheduler in-process, with the BASED_* switches of the run in its config; no server is started."""
    import based.bench.serve as serve

    monkeypatch.setattr(serve, "ServerProcess", None)  # starting one would fail loudly
    monkeypatch.setenv("BASED_BLOCKING_COPIES", "1")
    out = tmp_path / "engine.json"
    assert main(["--device", "cpu", "--presets", "debug", "--quick", "--engine-only", "--out", str(out),
                 "--git-rev", "abc", "--gpu", "none"]) == 0
    result = json.loads(out.read_text())
    debug = result["debug"]
    assert debug["engine_only"] and debug["offline"]["prefill_tokens_per_s"] > 0
    assert debug["offline_workload"]["requests"] == 8 and debug["offline_workload"]["output_tokens"] > 0
    assert result["config"]["environment"]["BASED_BLOCKING_COPIES"] == "1"
    assert 0 < result["summary"]["debug_bound_over_offline"] < 1
    assert not out.with_suffix(".png").exists()  # nothing streamed: no empty plot
    assert f"wrote {out}\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--presets", "debug", "--engine-only"])  # no --max-slots: nothing to ask
    assert "--engine-only needs --max-slots" in capsys.readouterr().err


def test_a_preset_that_fails_is_recorded_and_the_exit_is_nonzero(tmp_path, monkeypatch, capsys):
    import based.bench.serve as serve

    def broken(preset, args):
        raise RuntimeError("planted")

    monkeypatch.setattr(serve, "bench_engine_only", broken)
    out = tmp_path / "e.json"
    assert main(["--device", "cpu", "--presets", "debug", "--quick", "--engine-only", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["debug"]["error"] == "RuntimeError: planted"
    assert "debug failed (the error is in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--presets", "debug", "--engine-only", "--max-slots", "0"])
    assert "--max-slots must be >= 1, got 0" in capsys.readouterr().err


def test_a_saturation_run_sized_by_the_server_s_slots_is_bounded_too():
    """Where --max-slots is left to the server, the request count is known once it has started: the same bound."""
    import argparse

    from based.bench.serve import saturation_requests

    args = argparse.Namespace(saturation_prompts=None, min_prompts=50, saturation_factor=1.5)
    assert saturation_requests(args, 2048) == 3072
    args.saturation_factor = 100.0
    with pytest.raises(SystemExit, match=r"--saturation-factor 100 x 8801 slots makes a run of 880100 requests"):
        saturation_requests(args, 8801)
