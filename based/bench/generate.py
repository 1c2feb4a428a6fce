"""Generation benchmark: BASED 1.3b against Transformer++ 1.3b (same engine) and Hugging Face generate.

    python -m based.bench.generate [--out PATH] [--time-limit 150] [--quick]

One run does everything: a correctness smoke test on the GPU (CUDA-graph decode == eager decode == the
CPU model), then random-weight 1.3b and transformer-1.3b in bf16 with a 512-token prompt and up to 1024
new tokens, batch sizes 1 to the largest whose state fits, then LlamaForCausalLM.generate at the
Transformer++ size (built from a LlamaConfig, random weights, nothing downloaded). Reported per point:
tokens/s, latency per token (one decode step), peak memory, and achieved bandwidth against the copy
roofline (weights + every sequence's state traffic per step).

How it is timed, so that one run fits a few minutes of GPU time:
- decoding is greedy, the step captured in a CUDA graph (based.generation.Decoder); a step's cost does not
  depend on the position for either engine (BASED's state is fixed, the Transformer++ step reads its
  whole preallocated KV cache), so when 1023 steps would take longer than --point-seconds, only as many
  steps as fit are timed (`steps_timed`), after the 512-token prefill;
- prompts are prefilled for at most --prefill-batch sequences and their state copied into the other
  slots: decode cost does not depend on what the state holds;
- Hugging Face generate is timed over --hf-new-tokens tokens: decode tokens/s = B (n - 1) / (t_n - t_1).
The time limit skips the remaining (largest) points; everything measured is written as it comes.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

PROMPT, NEW_TOKENS = 512, 1024
DEVICE = "cuda"


class Clock:
    def __init__(self, limit_s: float):
        self.start, self.limit = time.perf_counter(), limit_s

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.start)


def build(preset: str, dtype=torch.bfloat16):
    from based import BasedConfig, BasedForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = BasedForCausalLM(BasedConfig.from_preset(preset))
    return model.to(dtype).eval()


def weights_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_traffic_bytes(model, seq_len: int, dtype) -> int:
    """Bytes one sequence's decode step moves through its state: linear-attention and conv states are
    read and written whole; attention reads its whole cache (ring or preallocated) and writes one row."""
    from based.layers import BaseConv, LinearAttention

    total = 0
    for block in model.transformer.layers:
        nbytes = block.mixer.inference_state_bytes(seq_len, 1, dtype)
        total += 2 * nbytes if isinstance(block.mixer, (LinearAttention, BaseConv)) else nbytes
    return total


def fill_slots(decoder, n: int) -> None:
    """Copy slots 0 .. n-1 (prefilled) into every other slot, in blocks of n (no full-size temporary)."""
    B = decoder.batch_size
    tensors = [*decoder.state.tensors(), decoder.state.seqlen_offset, decoder.tokens]
    for start in range(n, B, n):
        m = min(n, B - start)
        for t in tensors:
            t[start : start + m].copy_(t[:m])


@torch.no_grad()
def profile_step(decoder, steps: int = 3) -> dict:
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
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return {
        "kernels_per_step": count / steps, "kernel_time_per_step_ms": sum(by_name.values()) / steps / 1e3,
        "top_kernels_ms_per_step": {name[:90]: us / steps / 1e3 for name, us in top},
    }


@torch.no_grad()
def smoke() -> dict:
    """CUDA-graph decode == eager decode == CPU, and teacher-forced GPU steps == the CPU forward (fp32)."""
    from based.generation import InferenceState, SamplingParams, generate, prefill

    out = {}
    for preset in ("debug", "transformer-debug"):
        cpu = build(preset, torch.float32).cpu()
        gpu = build(preset, torch.float32)
        gpu.load_state_dict(cpu.state_dict())
        ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
        tokens_cpu = generate(cpu, ids, 40)
        tokens_eager = generate(gpu, ids.to(DEVICE), 40, cuda_graph=False).cpu()
        tokens_graph = generate(gpu, ids.to(DEVICE), 40, cuda_graph=DEVICE == "cuda").cpu()
        seq = torch.cat([ids, tokens_cpu], 1)
        state = InferenceState.allocate(gpu, 2, max_seq_len=seq.shape[1])
        logits = [prefill(gpu, state, seq[:, :10].to(DEVICE))]
        for t in range(10, seq.shape[1] - 1):
            logits.append(gpu.step(seq[:, t].to(DEVICE), state.layers, state.seqlen_offset))
            state.seqlen_offset += 1
        ref = cpu(seq[:, :-1]).logits[:, 9:].transpose(0, 1)
        got = torch.stack(logits).cpu()
        params = SamplingParams(0.8, top_k=40, top_p=0.9)
        torch.manual_seed(1)
        a = generate(gpu, ids.to(DEVICE), 40, sampling=params)
        torch.manual_seed(1)
        b = generate(gpu, ids.to(DEVICE), 40, sampling=params)
        out[preset] = {
            "graph_equals_eager": bool(torch.equal(tokens_graph, tokens_eager)),
            "gpu_equals_cpu_greedy": bool(torch.equal(tokens_eager, tokens_cpu)),
            "teacher_forced_logits_rel_err": float((got - ref).norm() / ref.norm()),
            "seeded_sampling_reproducible": bool(torch.equal(a, b)),
        }
        print("smoke", preset, json.dumps(out[preset]), flush=True)
    return out


@torch.no_grad()
def bench_engine(preset: str, clock: Clock, args, copy_gbps: float) -> dict:
    from based.generation import Decoder

    model = build(preset)
    dtype = torch.bfloat16
    max_seq_len = PROMPT + NEW_TOKENS
    per_seq = model.inference_state_bytes(max_seq_len, 1, dtype)
    traffic = state_traffic_bytes(model, max_seq_len, dtype)
    wbytes = weights_bytes(model)
    gc.collect()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    # Beside the state: logits (bf16, then fp32 for sampling) and a few activations per sequence.
    per_seq_total = per_seq + 8 * model.config.vocab_size + 64 * model.config.d_model
    largest = int((free - args.headroom_gb * 2**30) // per_seq_total)
    batches = [b for b in (1, 4, 16, 64, 256, 1024, 4096) if b < largest] + [largest]
    if args.quick:
        batches = [b for b in (1, 64) if b <= largest]
    if args.batches:
        batches = list(dict.fromkeys(largest if b == "max" else min(int(b), largest) for b in args.batches))
    result = {
        "preset": preset, "compiled": args.compile, "parameters": model.num_parameters(), "weights_bytes": wbytes,
        "state_bytes_per_sequence": per_seq, "state_traffic_bytes_per_sequence_step": traffic,
        "largest_batch_that_fits": largest, "rows": [], "skipped_batches": [],
    }
    prompt = torch.randint(0, model.config.vocab_size, (min(args.prefill_batch, largest), PROMPT), device=DEVICE)
    for B in batches:
        if clock.left() < args.reserve_s:
            result["skipped_batches"].append(B)
            continue
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        decoder = Decoder(model, B, max_seq_len=max_seq_len, compile=args.compile)
        n0 = min(B, prompt.shape[0])
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        decoder.add(prompt[:n0])
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t1
        fill_slots(decoder, n0)
        out = torch.empty(B, NEW_TOKENS, dtype=torch.long, device=DEVICE)
        for i in range(3):  # estimate a step, then time as many as fit
            out[:, i].copy_(decoder.step())
        torch.cuda.synchronize()
        est = time.perf_counter()
        for i in range(3, 8):
            out[:, i].copy_(decoder.step())
        torch.cuda.synchronize()
        est = (time.perf_counter() - est) / 5
        steps = int(min(NEW_TOKENS - 16, max(20, args.point_seconds / est)))  # room for profiled steps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(8, 8 + steps):
            out[:, i].copy_(decoder.step())
        end.record()
        end.synchronize()
        step_ms = start.elapsed_time(end) / steps
        step_bytes = wbytes + B * traffic
        row = {
            "batch": B, "steps_timed": steps, "step_ms": step_ms, "tokens_per_s": B / step_ms * 1e3,
            "latency_per_token_ms": step_ms, "prefill_sequences": n0, "prefill_s": prefill_s,
            "setup_s": t1 - t0, "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30,
            "bytes_per_step": step_bytes, "achieved_GBps": step_bytes / step_ms / 1e6,
            "roofline_tokens_per_s": B * copy_gbps * 1e9 / step_bytes,
        }
        row["fraction_of_roofline"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
        if B in (1, batches[-1]) and clock.left() > args.reserve_s:
            try:
                row["profile"] = profile_step(decoder)
            except Exception as e:  # noqa: BLE001 - the profile is extra information
                row["profile"] = {"error": repr(e)}
        result["rows"].append(row)
        print(preset, json.dumps(row), flush=True)
        del decoder, out
        gc.collect()
        torch.cuda.empty_cache()
    if args.compile and clock.left() > args.reserve_s:
        # Fusion changes bf16 rounding: report how often greedy tokens agree rather than assert equality.
        from based.generation import generate

        ids = prompt[:2, :64]
        eager, fused = generate(model, ids, 32), generate(model, ids, 32, compile=True)
        result["compiled_vs_eager_greedy_token_agreement"] = float((eager == fused).float().mean())
    del model
    gc.collect()
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
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    n = args.hf_new_tokens
    result = {"transformers": transformers.__version__, "parameters": model.num_parameters(),
              "attn_implementation": model.config._attn_implementation,
              "new_tokens": n, "rows": [], "skipped_batches": []}

    def run(ids, new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(torch.randint(0, ref.vocab_size, (1, 16), device=DEVICE), 2)  # warm-up
    for B in (1, 16, 64, 128) if not args.quick else (1, 16):
        if clock.left() < args.reserve_s / 2:
            result["skipped_batches"].append(B)
            continue
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, ref.vocab_size, (B, PROMPT), device=DEVICE)
        t1, tn = run(ids, 1), run(ids, n)
        row = {"batch": B, "prefill_plus_one_s": t1, f"generate_{n}_s": tn,
               "step_ms": (tn - t1) / (n - 1) * 1e3, "tokens_per_s": B * (n - 1) / (tn - t1),
               "end_to_end_tokens_per_s": B * n / tn, "peak_memory_GiB": torch.cuda.max_memory_allocated() / 2**30}
        result["rows"].append(row)
        print("hf_llama", json.dumps(row), flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


ENGINES = ("based", "based_compiled", "transformer", "transformer_compiled", "hf_llama")


def summarize(result: dict) -> dict:
    """Best tokens/s per model (eager or compiled step, whichever is faster), the ratios the issue asks
    for, and BASED's batch-1 latency against the time to read its weights once."""
    def rows(*keys):
        return [(k, r) for k in keys if isinstance(result.get(k), dict) for r in result[k].get("rows", [])]

    summary = {}
    models = (("based", ("based", "based_compiled")), ("transformer", ("transformer", "transformer_compiled")),
              ("hf_llama", ("hf_llama",)))
    for model, keys in models:
        found = rows(*keys)
        if found:
            key, best = max(found, key=lambda kr: kr[1]["tokens_per_s"])
            summary[f"{model}_best_tokens_per_s"] = best["tokens_per_s"]
            summary[f"{model}_best_at"] = f"{key}, batch {best['batch']}"
    best = {k[: -len("_best_tokens_per_s")]: v for k, v in summary.items() if k.endswith("_best_tokens_per_s")}
    for other in ("transformer", "hf_llama"):
        if "based" in best and other in best:
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
    for key in ENGINES:
        for r in (result.get(key) or {}).get("rows", []):
            gbps = f"{r['achieved_GBps']:.0f}" if "achieved_GBps" in r else "-"
            frac = f"{100 * r['fraction_of_roofline']:.0f}" if "fraction_of_roofline" in r else "-"
            steps = r.get("steps_timed", result.get(key, {}).get("new_tokens", 0) - 1)
            lines.append(f"| {key} | {r['batch']} | {steps} | {r['tokens_per_s']:.0f} | {r['step_ms']:.3f} | "
                         f"{r['peak_memory_GiB']:.1f} | {gbps} | {frac} |")
    lines.append(json.dumps(result.get("summary", {}), indent=1))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="based bench generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/generation-<gpu>-<date>.json)")
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds; later (larger) points are skipped")
    p.add_argument("--reserve-s", type=float, default=25.0, help="stop starting points with less time left")
    p.add_argument("--point-seconds", type=float, default=2.0, help="decode time per point (full 1023 steps if less)")
    p.add_argument("--prefill-batch", type=int, default=64)
    p.add_argument("--headroom-gb", type=float, default=10.0)
    p.add_argument("--hf-new-tokens", type=int, default=24)
    p.add_argument("--git-rev", default=None, help="recorded revision (default: git rev-parse HEAD)")
    p.add_argument("--skip", nargs="*", default=[], choices=["smoke", "based", "transformer", "hf_llama"])
    p.add_argument("--quick", action="store_true", help="two batch sizes per engine")
    p.add_argument("--batches", nargs="*", default=None, help="batch sizes of both engines ('max' = largest that fits)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block's step (based.generation.engine.compiled_step); the engines' "
                        "results are recorded as based_compiled / transformer_compiled")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("based bench generate needs a CUDA device", file=sys.stderr)
        return 2
    from .ops import _git_rev, copy_bandwidth

    clock = Clock(args.time_limit)
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    out = args.out or Path("benchmarks/results") / f"generation-{gpu.split()[-1].lower()}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": date, "gpu": gpu, "git_revision": args.git_rev or _git_rev(), "torch": torch.__version__,
        "python": platform.python_version(),
        "config": {"prompt_len": PROMPT, "new_tokens": NEW_TOKENS, "dtype": "bfloat16", "weights": "random",
                   "decoding": "greedy", "engine": "based.generation.Decoder, step captured in a CUDA graph",
                   "timer": "CUDA events over steps_timed decode steps after prefill; HF: wall clock"},
    }
    result["copy_GBps"] = copy_bandwidth()

    def save():
        result["summary"] = summarize(result)
        out.write_text(json.dumps(result, indent=1) + "\n")

    sections = [("smoke", smoke), ("based", lambda: bench_engine("1.3b", clock, args, result["copy_GBps"])),
                ("transformer", lambda: bench_engine("transformer-1.3b", clock, args, result["copy_GBps"])),
                ("hf_llama", lambda: bench_hf(clock, args))]
    for name, fn in sections:
        if name in args.skip:
            continue
        if args.compile and name in ("based", "transformer"):
            name += "_compiled"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
