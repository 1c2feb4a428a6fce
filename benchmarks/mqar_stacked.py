"""MQAR training throughput on a GPU (issue 20): summed training steps/s of today's path (one run, eager, as
each process of `--jobs N` trains) against stacked runs (a model's 4 figure-2 learning rates as one vmapped
model, eager and as CUDA graphs), on figure-2 groups at full size; Mamba also with the reference scan. And a
numerics check: stacked training on the GPU (fp32 matmuls, graphs) against the CPU, on a tiny run.

    BASED_GIT_REV=$(git rev-parse HEAD) python benchmarks/mqar_stacked.py --out results.json
    python benchmarks/mqar_stacked.py --out c.json --concurrent lightning-64-h4+mamba2-64-n16   # two groups at once

`--count-ops` (CPU, no GPU needed) counts instead the ops that launch a kernel (aten calls less views) in
one training step, today's path for one run against the stacked step of a model's 4 runs, per training
length: the launch count that CUDA graphs then replay.

Rates are measured over the first STEPS steps of each group's real schedule (task shapes mixed as in
training) after warm-up and capture; a group's full time is projected as 22,624 steps at that rate. Setup
(data to the device, graph capture) is reported apart.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

import based.layers.mamba as mamba_layer
from based.mqar import MQARRun, MQARTask, figure2_runs
from based.mqar.stacked import StackedTrainer, group_runs
from based.mqar.train import (
    MQARModel, _param_groups, fit, query_loss, query_positions, task_data,
)
from based.ops.ssm import fused as scan
from based.ops.ssm import selective_scan

GROUPS = {  # name -> (mixer, d_model, mixer_kwargs) of FIGURE2_MODELS; the largest Mamba last (memory)
    "based-64-f16": ("linear_attn", 64, {"feature_dim": 16}),
    "mamba-128-n16": ("mamba", 128, {"ssm_state_size": 16}),
    "attention-128": ("attention", 128, {}),
    "h3-128": ("h3", 128, {}),
    "hyena-128": ("hyena", 128, {}),
    "swa-128-w64": ("sliding_window", 128, {"window_size": 64}),
    "lightning-128-h4": ("lightning", 128, {"lightning_num_heads": 4}),
    "mamba2-128-n16": ("mamba2", 128, {"ssm_state_size": 16}),
    "rwkv-128": ("rwkv", 128, {}),
    "mamba-64-n8": ("mamba", 64, {"ssm_state_size": 8}),
    "mamba-256-n24": ("mamba", 256, {"ssm_state_size": 24}),
    # d_model 64 groups, the smallest kernels (for --concurrent)
    "lightning-64-h4": ("lightning", 64, {"lightning_num_heads": 4}),
    "mamba2-64-n16": ("mamba2", 64, {"ssm_state_size": 16}),
    "h3-64": ("h3", 64, {}),
    "rwkv-64": ("rwkv", 64, {}),
    "hyena-64": ("hyena", 64, {}),
}


def profile(names: list[str], steps: int, out: str) -> None:
    """Where a stacked step's GPU time goes: torch.profiler over `steps` eager steps of each group (after
    warm-up), the kernels by GPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runs_of = {(g[0].mixer, g[0].d_model, json.dumps(g[0].mixer_kwargs, sort_keys=True)): g
               for g in group_runs(figure2_runs())}
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "git_rev": os.environ.get("BASED_GIT_REV", "unknown"), "groups": {}}
    for name in names:
        mixer, d, kw = GROUPS[name]
        runs = runs_of[(mixer, d, json.dumps(kw, sort_keys=True))]
        entry = {}
        try:
            eager = StackedTrainer(runs, "cuda", cuda_graphs=False)
            for _ in range(5):
                eager.step()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    eager.step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
            print(name, "\n", table, flush=True)
            entry["eager_profile_top25"] = table.splitlines()
            del eager
        except Exception as error:  # report and go on
            entry["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        torch.cuda.empty_cache()
        result["groups"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "eager_profile_top25"}), flush=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def numerics() -> dict:
    """Stacked training of 2 runs, 10 steps: CUDA (graphs, and eager) against the CPU, fp32 matmuls."""
    torch.set_float32_matmul_precision("highest")
    tiny = dict(train=(MQARTask(16, 2, 40), MQARTask(24, 3, 24)), test=(MQARTask(16, 2, 8),), vocab_size=32,
                epochs=2, batch_size=16, warmup_frac=0.3)
    out = {}
    for mixer, d, kw in (("linear_attn", 16, {"feature_dim": 4}), ("mamba", 16, {"ssm_state_size": 4}),
                         ("attention", 16, {})):
        runs = [MQARRun(mixer, d, lr, kw, **tiny) for lr in (1e-3, 1e-2)]
        result = {}
        trainers = {"cpu": StackedTrainer(runs, "cpu"), "cuda_eager": StackedTrainer(runs, "cuda"),
                    "cuda_graphs": StackedTrainer(runs, "cuda", cuda_graphs=True)}
        losses = {name: [] for name in trainers}
        for name, t in trainers.items():
            for _ in range(t.total_steps):
                t.step()
                losses[name].append(t.losses.tolist())
        for name in ("cuda_eager", "cuda_graphs"):
            result[f"{name}_max_loss_diff"] = max(
                abs(a - b) for x, y in zip(losses[name], losses["cpu"]) for a, b in zip(x, y))
            result[f"{name}_max_param_diff"] = (trainers[name].flat.cpu() - trainers["cpu"].flat).abs().max().item()
        result["graphs_used"] = trainers["cuda_graphs"].cuda_graphs
        out[mixer] = result
    torch.set_float32_matmul_precision("high")
    return out


def baseline_rate(run: MQARRun, steps: int) -> float:
    """Steps/s of train.fit's loop (today's path, one run, eager) over `steps` steps after 5 of warm-up."""
    start = []

    def stop(s: int) -> bool:
        if s == 5:
            start.append(_sync_time())
        return s == 5 + steps

    fit(run, "cuda", stop=stop)
    return steps / (_sync_time() - start[0])


def stacked_rate(runs: list[MQARRun], steps: int, graphs: bool, compile: bool = False) -> dict:
    t0 = time.perf_counter()
    trainer = StackedTrainer(runs, "cuda", cuda_graphs=graphs, compile=compile)
    trainer.step()  # captures
    t1 = _sync_time()
    for _ in range(3):
        trainer.step()
    start = _sync_time()
    for _ in range(steps):
        trainer.step()
    seconds = _sync_time() - start
    k = len(runs)
    return {"k": k, "graphs": trainer.cuda_graphs, "setup_s": round(t1 - t0, 2),
            "stacked_steps_per_s": round(steps / seconds, 1), "summed_steps_per_s": round(k * steps / seconds, 1),
            "projected_group_s": round(trainer.total_steps * seconds / steps, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            "task_ms": task_times(trainer) if trainer.cuda_graphs else None}


def concurrent_rate(groups: list[list[MQARRun]], steps: int) -> dict:
    """Several groups' stacked steps at once, each replaying its graphs on a CUDA stream of its own, against each
    alone: whether small groups leave the GPU room that another group's kernels can fill (one process, so no
    MPS is needed for their kernels to overlap). Both trainers follow their own schedules in lockstep."""
    trainers = [StackedTrainer(runs, "cuda", cuda_graphs=True) for runs in groups]
    alone = []
    for trainer in trainers:
        for _ in range(4):  # captures, then warm
            trainer.step()
        start = _sync_time()
        for _ in range(steps):
            trainer.step()
        alone.append(_sync_time() - start)
    streams = [torch.cuda.Stream() for _ in trainers]
    main_stream = torch.cuda.current_stream()
    for stream in streams:
        stream.wait_stream(main_stream)
    start = _sync_time()
    for _ in range(steps):
        for trainer, stream in zip(trainers, streams):
            with torch.cuda.stream(stream):
                trainer.step()
    for stream in streams:
        main_stream.wait_stream(stream)
    together = _sync_time() - start
    summed = sum(t.k for t in trainers) * steps
    return {"groups": [t.runs[0].model_name for t in trainers], "k": [t.k for t in trainers],
            "alone_s": [round(a, 3) for a in alone], "together_s": round(together, 3),
            "summed_steps_per_s_one_after_the_other": round(summed / sum(alone), 1),
            "summed_steps_per_s_together": round(summed / together, 1),
            "speedup": round(sum(alone) / together, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}


def task_times(trainer: StackedTrainer, reps: int = 20) -> dict:
    """ms per stacked step of each training task (its graph replayed on one of its own steps), and each task's
    share of the group's steps: where a group's time goes by sequence length."""
    times = {}
    for task, graph in trainer.graphs.items():
        first = trainer.tasks.index(task)
        trainer.step_t.fill_(first)  # a replay reads the batch of step step_t: one of this task's
        graph.replay()
        start = _sync_time()
        for _ in range(reps):
            trainer.step_t.fill_(first)  # stay on this task's steps: its example indices
            graph.replay()
        spec = trainer.runs[0].train[task]
        times[f"T{spec.seq_len}_kv{spec.num_kv_pairs}"] = {
            "ms": round(1e3 * (_sync_time() - start) / reps, 3),
            "share_of_steps": round(trainer.tasks.count(task) / len(trainer.tasks), 3)}
    return times


_VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze", "permute",
          "as_strided", "split", "split_with_sizes", "unbind", "detach", "alias", "reshape", "_reshape_alias",
          "lift_fresh", "lift_fresh_copy", "empty", "empty_like", "empty_strided", "narrow", "view_as"}


def count_ops(out: str, batch: int = 8) -> None:
    """Kernel-launching ops per step (CPU; the count does not depend on the batch size)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ not in _VIEWS
            return func(*args, **(kwargs or {}))

    def counted(step) -> int:
        step()  # first steps create optimizer state
        with Count() as c:
            step()
        return c.n

    result = {"date": datetime.date.today().isoformat(), "git_rev": os.environ.get("BASED_GIT_REV", "unknown"),
              "what": "ops per training step: today's path (one run) and the stacked step (4 runs)", "models": {}}
    for group in group_runs(figure2_runs()):
        counts = {}
        for T, kv in ((64, 4), (128, 8), (256, 16)):
            tiny = dict(train=(MQARTask(T, kv, batch),), test=(MQARTask(T, kv, batch),), vocab_size=8192, epochs=2,
                        batch_size=batch)
            runs = [MQARRun(r.mixer, r.d_model, r.lr, r.mixer_kwargs, **tiny) for r in group]
            torch.manual_seed(0)
            model = MQARModel(runs[0].config())
            optimizer = torch.optim.AdamW(_param_groups(model, 0.1), lr=1e-3)
            x, y = task_data(runs[0], "train", 0)
            positions, targets = query_positions(y)

            def today():
                loss = query_loss(model, x, positions, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()

            counts[f"T{T}"] = {"today_one_run": counted(today), "stacked_4_runs": counted(StackedTrainer(runs).step)}
        result["models"][group[0].model_name] = counts
        print(group[0].model_name, json.dumps(counts), flush=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--count-ops", action="store_true", help="count ops per step on the CPU instead of timing")
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--baseline", default="based-64-f16,mamba-128-n16,h3-128")
    ap.add_argument("--eager", default="based-64-f16,mamba-128-n16")
    ap.add_argument("--compile", default="", help="groups also timed with torch.compile of the step (setup_s"
                    " then includes compiling every batch shape)")
    ap.add_argument("--ssm-runs-first", default="", help="groups also timed with the fused scan's outputs copied "
                    "runs-first under vmap (based.ops.ssm.fused.RUNS_FIRST_OUT)")
    ap.add_argument("--profile", action="store_true", help="profile --groups (torch.profiler) instead of timing")
    ap.add_argument("--concurrent", nargs="*", default=None, metavar="A+B",
                    help="instead of timing, sets of groups (names joined by +) trained at once on a stream each, "
                         "against one after the other")
    args = ap.parse_args()
    if args.count_ops:
        return count_ops(args.out)
    torch.set_float32_matmul_precision("high")
    if args.profile:
        return profile(args.groups.split(","), min(args.steps, 20), args.out)
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "git_rev": os.environ.get("BASED_GIT_REV", "unknown"),
              "steps_timed": args.steps, "numerics": None if args.concurrent is not None else numerics(),
              "groups": {}}
    runs_of = {(g[0].mixer, g[0].d_model, json.dumps(g[0].mixer_kwargs, sort_keys=True)): g
               for g in group_runs(figure2_runs())}

    def group(name: str) -> list[MQARRun]:
        mixer, d, kw = GROUPS[name]
        return runs_of[(mixer, d, json.dumps(kw, sort_keys=True))]

    def record(section: str, name: str, entry: dict) -> None:
        """One measurement into the JSON (rewritten after each), the device's memory back for the next."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result[section][name] = entry
        print(name, json.dumps(entry), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.concurrent is not None:
        result.pop("numerics")
        result["concurrent"] = {}
        for names in args.concurrent:
            try:
                entry = concurrent_rate([group(n) for n in names.split("+")], args.steps)
            except Exception as error:  # noqa: BLE001 - report and go on
                entry = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
            record("concurrent", names, entry)
        return
    print(json.dumps(result["numerics"]), flush=True)
    for name in args.groups.split(","):
        mixer = GROUPS[name][0]
        runs = group(name)
        entry = {}
        try:
            if name in args.baseline.split(","):
                entry["baseline_steps_per_s"] = round(baseline_rate(runs[1], args.steps // 4), 1)
            if name in args.eager.split(","):
                entry["stacked_eager"] = stacked_rate(runs, args.steps // 4, graphs=False)
            for k in (4, 2):
                try:
                    entry["stacked_graphs"] = stacked_rate(runs[:k], args.steps, graphs=True)
                    break
                except torch.OutOfMemoryError as error:
                    entry[f"oom_k{k}"] = str(error)[:200]
                    torch.cuda.empty_cache()
            if name in args.compile.split(","):
                entry["stacked_graphs_compiled"] = stacked_rate(runs[:entry["stacked_graphs"]["k"]], args.steps,
                                                                graphs=True, compile=True)
            if name in args.ssm_runs_first.split(","):
                scan.RUNS_FIRST_OUT = True
                try:
                    entry["stacked_graphs_ssm_runs_first"] = stacked_rate(runs[:entry["stacked_graphs"]["k"]],
                                                                          args.steps, graphs=True)
                finally:
                    scan.RUNS_FIRST_OUT = False
            if mixer == "mamba":
                chunked = mamba_layer.chunk_selective_scan
                mamba_layer.chunk_selective_scan = selective_scan  # the reference loop over T
                try:
                    entry["stacked_graphs_reference_scan"] = stacked_rate(runs[:entry["stacked_graphs"]["k"]],
                                                                          args.steps // 2, graphs=True)
                finally:
                    mamba_layer.chunk_selective_scan = chunked
        except Exception as error:  # report and go on to the next group
            entry["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        record("groups", name, entry)


if __name__ == "__main__":
    main()
