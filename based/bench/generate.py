"""Generation benchmark: BASED 1.3b against Transformer++ 1.3b (same engine) and Hugging Face generate.

    python -m based.bench.generate [--out PATH] [--time-limit 150] [--quick]
    python -m based.bench.generate --skip transformer hf_llama --presets rwkv-1.3b mamba2-1.3b  # more engines

One run does everything: a correctness smoke test on the GPU (CUDA-graph decode == eager decode == the
CPU model), then random-weight 1.3b and transformer-1.3b in bf16 with a 512-token prompt and up to 1024
new tokens, batch sizes 1 to the largest whose state fits, then LlamaForCausalLM.generate at the
Transformer++ size (built from a LlamaConfig, random weights, nothing downloaded). Reported per point:
tokens/s, latency per token (one decode step), peak memory, and achieved bandwidth against the copy
roofline (weights + every sequence's state traffic per step). `--presets` adds any preset (RWKV,
Lightning, Mamba-2, ...) as an engine of its own, recorded under its name with the same rows and state
sizes, its debug-size preset joining the smoke test; `--device cpu` runs all of it on the CPU in fp32
(wall-clock timing, no profile), which only checks the wiring.

How it is timed, so that one run fits a few minutes of GPU time:
- decoding is greedy, the step captured in a CUDA graph (based.generation.Decoder); when 1023 steps
  would take longer than --point-seconds, only as many steps as fit are timed (`steps_timed`). BASED's
  step costs the same at every position (its state is fixed), so its steps are timed right after the
  512-token prefill. A full-attention step reads every cached row (the decode-attention kernel skips
  the unwritten ones), so its cost grows with the position: those engines are stepped, untimed, to the
  middle of the generation and timed there (`first_timed_position`), where the cost is the average over
  all new tokens; their roofline counts the rows cached at that position;
- prompts are prefilled for at most --prefill-batch sequences and their state copied into the other
  slots: decode cost does not depend on what the state holds;
- Hugging Face generate is timed over --hf-new-tokens tokens: decode tokens/s = B (n - 1) / (t_n - t_1).
The time limit skips the remaining (largest) points; everything measured is written as it comes. With
--presets, the engines share the time left equally (each gets its part when it starts, unspent time
passes to the next) and each times batch 1, then its largest batch, then the others.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ..commands import HelpFormatter
from ..models.presets import debug_preset

PROMPT, NEW_TOKENS = 512, 1024


class Clock:
    """Seconds left of a time limit; a clock made by `share` also stops when its parent does."""

    def __init__(self, limit_s: float, parent: Clock | None = None):
        self.start, self.limit, self.parent = time.perf_counter(), limit_s, parent

    def left(self) -> float:
        own = self.limit - (time.perf_counter() - self.start)
        return own if self.parent is None else min(own, self.parent.left())

    def share(self, n: int, reserve_s: float) -> Clock:
        """The clock of one of n sections still to run: an equal part of the time left beyond reserve_s
        (checked against reserve_s like the parent, so the section stops when its part is spent)."""
        return Clock(max(0.0, self.left() - reserve_s) / n + reserve_s, parent=self)


def build(preset: str, dtype=torch.bfloat16, device="cuda", overrides: dict | None = None):
    from based import BasedConfig, BasedForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = BasedForCausalLM(BasedConfig.from_preset(preset, **(overrides or {})))
    return model.to(dtype).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_ms(device: torch.device, fn) -> float:
    """Time of fn(): CUDA events around its kernels on the GPU, the wall clock on the CPU."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure_copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s): the roofline's bandwidth."""
    if device.type == "cuda":
        from .ops import copy_bandwidth

        return copy_bandwidth(device)
    nbytes, reps = 64 << 20, 5
    x = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    y = torch.empty_like(x)
    y.copy_(x)
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    return 2 * nbytes * reps / (time.perf_counter() - t) / 1e9


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_traffic_bytes(model, seq_len: int, dtype) -> int:
    """Bytes one sequence's decode step moves through its state: recurrent states (linear attention,
    convs, RWKV, Lightning, Mamba, Mamba-2) are read and written whole; caches (a mixer's `state_is_cache`:
    attention's, ring or preallocated, and Hyena's history) are read whole and written one row or column,
    counted as the read. A mixer that says otherwise (`decode_traffic_bytes`: linear attention writing its
    state every fold_every tokens) is taken at its word."""
    total = 0
    for block in model.transformer.layers:
        if hasattr(block.mixer, "decode_traffic_bytes"):
            total += block.mixer.decode_traffic_bytes(1, dtype)
            continue
        nbytes = block.mixer.inference_state_bytes(seq_len, 1, dtype)
        total += nbytes if getattr(block.mixer, "state_is_cache", False) else 2 * nbytes
    return total


def fold_cycle(model) -> int:
    """Steps after which a decode step's cost repeats: linear attention's fold_every (1 without it)."""
    return max((getattr(block.mixer, "fold_every", 1) for block in model.transformer.layers), default=1)


LOG_LEN = 32  # steps between reads of the tokens, as generate's default check_every


def run_steps(decoder, out: torch.Tensor, start: int, stop: int) -> None:
    """Steps start .. stop-1, their tokens into out[:, start:stop] as generate takes them: from the decoder's
    log, one read per LOG_LEN steps (not a copy kernel per step)."""
    for i in range(start, stop):
        decoder.step()
        if (i + 1 - start) % LOG_LEN == 0 or i + 1 == stop:
            n = (i - start) % LOG_LEN + 1
            out[:, i + 1 - n : i + 1] = decoder.recent(n)


def fill_slots(decoder, n: int) -> None:
    """Copy slots 0 .. n-1 (prefilled) into every other slot, in blocks of n (no full-size temporary)."""
    B = decoder.batch_size
    tensors = [*decoder.state.tensors(), decoder.state.seqlen_offset, decoder.tokens]
    for start in range(n, B, n):
        m = min(n, B - start)
        for t in tensors:
            t[start : start + m].copy_(t[:m])


@torch.no_grad()
def profile_step(decoder, steps: int = 3, top: int = 8) -> dict:
    """Kernels of eager decode steps (the graph replays the same ones): how many, their summed time, the
    costliest. Summed kernel time well under the graph's step time means gaps between small kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder._step()
        torch.cuda.synchronize()
    by_name: dict[str, float] = {}
    count = 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            count += 1
            us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
            by_name[e.name] = by_name.get(e.name, 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "kernels_per_step": count / steps, "kernel_time_per_step_ms": sum(by_name.values()) / steps / 1e3,
        "top_kernels_ms_per_step": {name[:90]: us / steps / 1e3 for name, us in top},
    }


@torch.no_grad()
def smoke(presets=("debug", "transformer-debug"), device="cuda") -> dict:
    """CUDA-graph decode == eager decode == CPU, and teacher-forced GPU steps == the CPU forward (fp32)."""
    from based.generation import InferenceState, SamplingParams, generate, prefill

    device = torch.device(device)
    out = {}
    for preset in presets:
        cpu = build(preset, torch.float32, "cpu")
        gpu = build(preset, torch.float32, device)
        gpu.load_state_dict(cpu.state_dict())
        ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
        tokens_cpu = generate(cpu, ids, 40)
        tokens_eager = generate(gpu, ids.to(device), 40, cuda_graph=False).cpu()
        tokens_graph = generate(gpu, ids.to(device), 40, cuda_graph=device.type == "cuda").cpu()
        seq = torch.cat([ids, tokens_cpu], 1)
        state = InferenceState.allocate(gpu, 2, max_seq_len=seq.shape[1])
        logits = [prefill(gpu, state, seq[:, :10].to(device))]
        for t in range(10, seq.shape[1] - 1):
            logits.append(gpu.step(seq[:, t].to(device), state.layers, state.seqlen_offset))
            state.seqlen_offset += 1
        ref = cpu(seq[:, :-1]).logits[:, 9:].transpose(0, 1)
        got = torch.stack(logits).cpu()
        params = SamplingParams(0.8, top_k=40, top_p=0.9)
        torch.manual_seed(1)
        a = generate(gpu, ids.to(device), 40, sampling=params)
        torch.manual_seed(1)
        b = generate(gpu, ids.to(device), 40, sampling=params)
        out[preset] = {
            "graph_equals_eager": bool(torch.equal(tokens_graph, tokens_eager)),
            "gpu_equals_cpu_greedy": bool(torch.equal(tokens_eager, tokens_cpu)),
            "teacher_forced_logits_rel_err": float((got - ref).norm() / ref.norm()),
            "seeded_sampling_reproducible": bool(torch.equal(a, b)),
        }
        print("smoke", preset, json.dumps(out[preset]), flush=True)
    return out


FUSED = {"auto": None, "on": True, "off": False}  # --fused -> Decoder(fused=)


@torch.no_grad()
def bench_engine(preset: str, clock: Clock, args, copy_gbps: float, first_largest: bool = False) -> dict:
    """One preset through based.generation.Decoder at each batch size; first_largest times batch 1, then
    the largest batch, then the others (rows still sorted by batch), so a short time share keeps both ends."""
    from based.generation import Decoder
    from based.generation.state import check_lengths, free_memory_bytes

    if clock.left() < args.reserve_s:  # not even the model is built
        return {"preset": preset, "rows": [], "skipped_batches": [], "skipped": "time limit reached before it"}
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(preset, dtype, device, args.set)
    prompt_len, new_tokens = args.prompt_len, args.new_tokens
    check_lengths(model, prompt_len, new_tokens)  # a full-attention layer's positional limit
    max_seq_len = prompt_len + new_tokens
    per_seq = model.inference_state_bytes(max_seq_len, 1, dtype)
    traffic = state_traffic_bytes(model, max_seq_len, dtype)
    grows = state_traffic_bytes(model, prompt_len, dtype) != traffic  # a full-attention cache
    wbytes = weights_bytes(model)
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    free = free_memory_bytes(device)
    # Beside the state: logits (bf16, then fp32 for sampling) and a few activations per sequence.
    per_seq_total = per_seq + 8 * model.config.vocab_size + 64 * model.config.d_model
    largest = int((free - args.headroom_gb * 2**30) // per_seq_total)
    if largest < 1:
        raise MemoryError(f"{free / 2**30:.1f} GiB free on {device} holds no sequence of {preset} beside "
                          f"--headroom-gb {args.headroom_gb}")
    batches = [b for b in (1, 4, 16, 64, 256, 1024, 4096) if b < largest] + [largest]
    if args.quick:
        batches = [b for b in (1, 64) if b <= largest]
    if args.batches:
        batches = list(dict.fromkeys(largest if b == "max" else min(int(b), largest) for b in args.batches))
    if first_largest and len(batches) > 2:
        ordered = sorted(batches)
        batches = [ordered[0], ordered[-1], *ordered[1:-1]]
    result = {
        "preset": preset, "compiled": args.compile, "parameters": model.num_parameters(), "weights_bytes": wbytes,
        "state_bytes_per_sequence": per_seq, "state_size": model.state_size(max_seq_len),
        "state_traffic_bytes_per_sequence_step": traffic, "largest_batch_that_fits": largest,
        "rows": [], "skipped_batches": [],
    }
    prompt = torch.randint(0, model.config.vocab_size, (min(args.prefill_batch, largest), prompt_len), device=device)
    for B in batches:
        if clock.left() < args.reserve_s:
            result["skipped_batches"].append(B)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        decoder = Decoder(model, B, max_seq_len=max_seq_len, compile=args.compile, fused=FUSED[args.fused],
                          log_len=LOG_LEN)
        n0 = min(B, prompt.shape[0])
        synchronize(device)
        t1 = time.perf_counter()
        decoder.add(prompt[:n0])
        synchronize(device)
        prefill_s = time.perf_counter() - t1
        fill_slots(decoder, n0)
        out = torch.empty(B, new_tokens, dtype=torch.long, device=device)
        run_steps(decoder, out, 0, 3)  # estimate a step, then time as many as fit
        synchronize(device)
        est = time.perf_counter()
        run_steps(decoder, out, 3, 8)
        synchronize(device)
        est = (time.perf_counter() - est) / 5
        # Whole fold cycles (linear attention writes its state every la_fold_every steps, a costlier step),
        # leaving room for the profiled steps.
        cycle = fold_cycle(model)
        steps = int(min(new_tokens - 16, -(-max(20, args.point_seconds / est) // cycle) * cycle))
        start = max(8, new_tokens // 2 - steps // 2) if grows else 8
        run_steps(decoder, out, 8, start)  # to the middle of the generation (see the module doc)

        def timed_steps():
            run_steps(decoder, out, start, start + steps)

        step_ms = elapsed_ms(device, timed_steps) / steps
        step_bytes = wbytes + B * (state_traffic_bytes(model, prompt_len + start + steps // 2, dtype) if grows else traffic)
        row = {
            "batch": B, "step": decoder.step_kind, "steps_timed": steps, "first_timed_position": prompt_len + start,
            "step_ms": step_ms, "tokens_per_s": B / step_ms * 1e3,
            "latency_per_token_ms": step_ms, "prefill_sequences": n0, "prefill_s": prefill_s,
            "setup_s": t1 - t0, "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "bytes_per_step": step_bytes, "achieved_GBps": step_bytes / step_ms / 1e6,
            "roofline_tokens_per_s": B * copy_gbps * 1e9 / step_bytes,
        }
        row["fraction_of_roofline"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
        if cuda and B in (1, max(batches)) and clock.left() > args.reserve_s:
            try:
                row["profile"] = profile_step(decoder, steps=max(3, min(cycle, 8)), top=args.profile_top)
            except Exception as e:  # noqa: BLE001 - the profile is extra information
                row["profile"] = {"error": repr(e)}
        result["rows"].append(row)
        print(preset, json.dumps(row), flush=True)
        del decoder, out
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if first_largest:
        result["rows"].sort(key=lambda r: r["batch"])
    variants = {}  # steps whose greedy tokens are compared with the eager step's
    if args.compile:
        variants["compiled"] = dict(compile=True, fused=False)
    if cuda and args.fused != "off":
        variants["fused"] = dict(fused=True)
    if variants and clock.left() > args.reserve_s:
        # Fusion changes bf16 rounding: report how often greedy tokens agree rather than assert equality.
        from based.generation import generate

        ids = prompt[:2, :64]
        eager = generate(model, ids, 32, fused=False)
        for name, kwargs in variants.items():
            tokens = generate(model, ids, 32, **kwargs)
            result[f"{name}_vs_eager_greedy_token_agreement"] = float((eager == tokens).float().mean())
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


@torch.no_grad()
def bench_hf(clock: Clock, args) -> dict:
    """LlamaForCausalLM.generate at the transformer-1.3b shape (random weights, bf16, SDPA)."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from based import BasedConfig

    ref = BasedConfig.from_preset("transformer-1.3b")
    config = LlamaConfig(
        vocab_size=ref.vocab_size, hidden_size=ref.d_model, intermediate_size=ref.mlp_inner,
        num_hidden_layers=ref.n_layer, num_attention_heads=ref.attn_num_heads,
        num_key_value_heads=ref.attn_num_heads, max_position_embeddings=ref.max_position_embeddings,
        rms_norm_eps=ref.rms_norm_eps, tie_word_embeddings=True,
    )
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16 if cuda else torch.float32).eval()
    n = args.hf_new_tokens
    result = {"transformers": transformers.__version__, "parameters": model.num_parameters(),
              "attn_implementation": model.config._attn_implementation,
              "new_tokens": n, "rows": [], "skipped_batches": []}

    def run(ids, new):
        synchronize(device)
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
        synchronize(device)
        return time.perf_counter() - t

    run(torch.randint(0, ref.vocab_size, (1, 16), device=device), 2)  # warm-up
    for B in (1, 16, 64, 128) if not args.quick else (1, 16):
        if clock.left() < args.reserve_s / 2:
            result["skipped_batches"].append(B)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, ref.vocab_size, (B, args.prompt_len), device=device)
        t1, tn = run(ids, 1), run(ids, n)
        row = {"batch": B, "prefill_plus_one_s": t1, f"generate_{n}_s": tn,
               "step_ms": (tn - t1) / (n - 1) * 1e3, "tokens_per_s": B * (n - 1) / (tn - t1),
               "end_to_end_tokens_per_s": B * n / tn,
               "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        result["rows"].append(row)
        print("hf_llama", json.dumps(row), flush=True)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def engines(result: dict) -> list[str]:
    """Keys of the engine sections in run order: based, transformer, each --presets preset (each with
    "_compiled" under --compile), hf_llama; failed or skipped sections have no rows."""
    return [k for k, v in result.items() if isinstance(v, dict) and isinstance(v.get("rows"), list)]


def summarize(result: dict) -> dict:
    """Best tokens/s per model (eager or compiled step, whichever is faster), BASED's ratio to each other
    model, and BASED's batch-1 latency against the time to read its weights once."""
    def rows(*keys):
        return [(k, r) for k in keys if isinstance(result.get(k), dict) for r in result[k].get("rows", [])]

    summary = {}
    models = dict.fromkeys(k.removesuffix("_compiled") for k in engines(result))
    for model in models:
        found = rows(model, f"{model}_compiled")
        if found:
            key, best = max(found, key=lambda kr: kr[1]["tokens_per_s"])
            summary[f"{model}_best_tokens_per_s"] = best["tokens_per_s"]
            summary[f"{model}_best_at"] = f"{key}, batch {best['batch']}"
    best = {k[: -len("_best_tokens_per_s")]: v for k, v in summary.items() if k.endswith("_best_tokens_per_s")}
    for other in models:
        if other != "based" and "based" in best and other in best:
            summary[f"based_over_{other}"] = best["based"] / best[other]
    ones = [(k, r) for k, r in rows("based", "based_compiled") if r["batch"] == 1]
    if ones:
        key, one = min(ones, key=lambda kr: kr[1]["step_ms"])
        weights_ms = result[key]["weights_bytes"] / (result["copy_GBps"] * 1e6)
        summary.update(batch1_latency_ms=one["step_ms"], batch1_latency_from=key, weights_read_ms=weights_ms,
                       batch1_over_weights_read=one["step_ms"] / weights_ms)
    return summary


def table(result: dict) -> str:
    lines = ["| engine | batch | steps timed | tok/s | ms/token | peak GiB | GB/s | % roofline |", "|---" * 8 + "|"]
    for key in engines(result):
        for r in result[key]["rows"]:
            gbps = f"{r['achieved_GBps']:.0f}" if "achieved_GBps" in r else "-"
            frac = f"{100 * r['fraction_of_roofline']:.0f}" if "fraction_of_roofline" in r else "-"
            peak = f"{r['peak_memory_GiB']:.1f}" if r.get("peak_memory_GiB") is not None else "-"
            steps = r.get("steps_timed", result[key].get("new_tokens", 0) - 1)
            lines.append(f"| {key} | {r['batch']} | {steps} | {r['tokens_per_s']:.0f} | {r['step_ms']:.3f} | "
                         f"{peak} | {gbps} | {frac} |")
    lines.append(json.dumps(result.get("summary", {}), indent=1))
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict:
    """["la_fold_every=1", "feature_map=full"] -> {"la_fold_every": 1, "feature_map": "full"}: Python literals
    where they parse, else strings; names checked against BasedConfig's fields."""
    import ast
    import dataclasses

    from based import BasedConfig

    fields = {f.name for f in dataclasses.fields(BasedConfig)}
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or name not in fields:
            raise ValueError(f"--set wants FIELD=VALUE with FIELD a BasedConfig field, got {item!r}")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value
    return out


def batch_size(text: str) -> int | str:
    """--batches' type: 'max' or a whole number >= 1 (0, -3 or 'abc' failed each engine's section, exit 0)."""
    if text == "max":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"each must be 'max' or a batch size >= 1, got {text!r}")
    return value


def check_settings(p: argparse.ArgumentParser, args: argparse.Namespace, presets: list[str]) -> None:
    """One line naming the flag for a value that cannot mean anything (negative, zero, NaN, inf) and for --set
    overrides the engines' presets refuse (the config's own message): before anything is built or timed. Such
    values used to fail inside a section (recorded, exit 0) or end in a traceback."""
    from based import BasedConfig

    from ..commands import number_problem

    checks = [("--time-limit", args.time_limit, 0), ("--reserve-s", args.reserve_s, 0),
              ("--point-seconds", args.point_seconds, 0), ("--headroom-gb", args.headroom_gb, 0),
              ("--prefill-batch", args.prefill_batch, 1), ("--profile-top", args.profile_top, 1),
              ("--hf-new-tokens", args.hf_new_tokens, 2)]  # (HF's tokens/s divides by n - 1)
    problem = next(filter(None, (number_problem(*check) for check in checks)), None)
    if problem:
        p.error(problem)
    if args.prompt_len < 1 or args.new_tokens < 32:
        p.error("--prompt-len must be >= 1 and --new-tokens >= 32 (8 warm-up, 20 timed and 3 profiled steps)")
    for preset in presets:
        try:
            BasedConfig.from_preset(preset, **args.set)
        except (ValueError, TypeError) as e:
            p.error(f"--set {' '.join(f'{k}={v!r}' for k, v in args.set.items())} on preset {preset}: {e}")


def main(argv=None) -> int:
    from based.cli import torch_device
    from based.models.presets import PRESETS

    p = argparse.ArgumentParser(prog="based bench generate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/generation-<gpu>-<date>.json)")
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds; later (larger) points are skipped")
    p.add_argument("--reserve-s", type=float, default=25.0, help="stop starting points with less time left")
    p.add_argument("--point-seconds", type=float, default=2.0, help="decode time per point (full 1023 steps if less)")
    p.add_argument("--prefill-batch", type=int, default=64, help="prompts prefilled at once (at most the batch)")
    p.add_argument("--headroom-gb", type=float, default=10.0,
                   help="GPU memory (GiB) left free when sizing the largest batch")
    p.add_argument("--hf-new-tokens", type=int, default=24, help="tokens each transformers Llama generate() decodes")
    p.add_argument("--git-rev", default=None, help="recorded revision (default: git rev-parse HEAD)")
    p.add_argument("--skip", nargs="*", default=[], choices=["smoke", "based", "transformer", "hf_llama"],
                   help="sections not run")
    p.add_argument("--presets", nargs="*", default=[], metavar="PRESET",
                   help="more engines, one per preset (e.g. rwkv-1.3b lightning-1.3b mamba2-1.3b "
                        "mamba2-hybrid-1.3b), recorded under the preset's name; their debug presets join the smoke")
    p.add_argument("--quick", action="store_true", help="two batch sizes per engine")
    p.add_argument("--batches", nargs="*", type=batch_size, default=None,
                   help="batch sizes of every engine ('max' = largest that fits)")
    p.add_argument("--prompt-len", type=int, default=PROMPT, help="prompt tokens prefilled before decoding")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="decode positions each point has room for")
    p.add_argument("--device", default="cuda", help="cuda, or cpu (fp32, wall clock: checks the wiring only)")
    p.add_argument("--profile-top", type=int, default=8,
                   help="kernels listed in each profiled row (batch 1 and the largest)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block's step (based.generation.engine.compiled_step); the engines' "
                        "results are recorded as based_compiled / transformer_compiled / <preset>_compiled")
    p.add_argument("--fused", choices=list(FUSED), default="auto",
                   help="the small-batch step of based.generation.fused: auto (on CUDA up to FUSED_MAX_BATCH "
                        "slots), on (every batch up to its MAX_ROWS) or off; each row records its step")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override BasedConfig fields of every engine's preset, e.g. la_fold_every=1 (recorded)")
    args = p.parse_args(argv)
    try:
        args.set = parse_overrides(args.set)
    except ValueError as e:
        p.error(str(e))
    unknown = [name for name in args.presets if name not in PRESETS]
    if unknown:
        p.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    engine_presets = [(name, preset) for name, preset in (("based", "1.3b"), ("transformer", "transformer-1.3b"))
                      if name not in args.skip] + [(preset, preset) for preset in args.presets]
    check_settings(p, args, [preset for _, preset in engine_presets])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("based bench generate needs a CUDA device (or --device cpu, to check the wiring)", file=sys.stderr)
        return 2
    try:
        device = torch_device(args.device)
    except ValueError as e:
        p.error(str(e))
    from ..commands import out_file_problem
    from .ops import _git_rev

    clock = Clock(args.time_limit)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    out = args.out or Path("benchmarks/results") / f"generation-{gpu.split()[-1].lower()}-{date}.json"
    problem = out_file_problem(out)  # (IsADirectoryError after the smoke test, NotADirectoryError at once)
    if problem:
        p.error(problem)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": date, "gpu": gpu, "git_revision": args.git_rev or _git_rev(), "torch": torch.__version__,
        "python": platform.python_version(),
        "config": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "dtype": "bfloat16" if device.type == "cuda" else "float32", "weights": "random",
                   "decoding": "greedy", "engine": "based.generation.Decoder, step captured in a CUDA graph"
                   + ("" if device.type == "cuda" else " (on the GPU; eager here)"),
                   "timer": "CUDA events over steps_timed decode steps after prefill; HF: wall clock"},
    }
    if args.presets:
        result["config"]["presets"] = args.presets
    if args.set:
        result["config"]["overrides"] = args.set
    tuning = {k: v for k, v in os.environ.items() if k.startswith("BASED_")}  # kernel knobs (BASED_GEMV_CONFIG, ...)
    if tuning:
        result["config"]["environment"] = tuning
    result["copy_GBps"] = measure_copy_bandwidth(device)

    def save():
        result["summary"] = summarize(result)
        out.write_text(json.dumps(result, indent=1) + "\n")

    smoke_presets = list(dict.fromkeys(["debug", "transformer-debug", *map(debug_preset, args.presets)]))

    def run_engine(preset: str, engines_left: int) -> dict:
        # With --presets the engines compete for the time: each gets an equal part of what is left when
        # it starts (what one leaves unspent passes to the next).
        engine_clock = clock.share(engines_left, args.reserve_s) if args.presets else clock
        return bench_engine(preset, engine_clock, args, result["copy_GBps"], first_largest=bool(args.presets))

    sections = [("smoke", lambda: smoke(smoke_presets, device))]
    for i, (name, preset) in enumerate(engine_presets):
        engines_left = len(engine_presets) - i
        sections.append((name + "_compiled" * args.compile, functools.partial(run_engine, preset, engines_left)))
    sections.append(("hf_llama", lambda: bench_hf(clock, args)))
    for name, fn in sections:
        if name in args.skip:
            continue
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - record the failure, keep the other sections
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} failed: {e!r}", file=sys.stderr, flush=True)
        save()
    result["elapsed_s"] = time.perf_counter() - clock.start
    save()
    print(table(result))
    print(f"\nwrote {out}")
    failed = [name for name, _ in sections if "error" in result.get(name, {})]
    if failed:  # recorded in the JSON, the other sections measured; but the benchmark did not do its job
        print(f"based bench generate: {', '.join(failed)} failed (the error is in {out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
