"""Learning curves of small MQAR runs on the CPU, per mixer, layout, width and learning rate.

    OMP_NUM_THREADS=1 python benchmarks/results/mqar-baselines-cpu-2026-12-06/curves.py OUT.jsonl \
        --mixers h3 hyena --layouts paper conv_hybrid --d-models 64 --lrs 1e-3 3e-3 1e-2 --steps 1000

One run per (mixer, layout, d_model, lr), appended to OUT.jsonl as it finishes (a rerun skips the runs
already there). Task: T = 64, 4 key-value pairs, vocabulary 256, fresh examples every step (a pool of
steps x batch examples, each seen once), batch 32; AdamW (wd 0.1 on matrices), 5% warm-up, cosine,
clipping at 1 (based.mqar.train's recipe); the model's max_position_embeddings (Hyena's l_max) is
--max-seq-len, default T. Every `--eval-every` steps: mean train loss since the last
point and accuracy on 500 held-out examples (chance 1/128 on the value half of the vocabulary).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from based.data.mqar import generate_mqar
from based.mqar.model import MQARModel, mqar_config
from based.mqar.train import query_positions

FEATURES = {"linear_attn": {"feature_dim": 16}, "mamba": {"ssm_state_size": 16}, "mamba2": {"ssm_state_size": 16}}


def run(mixer, layout, d_model, lr, steps, batch, vocab, seq_len, pairs, eval_every, seed=0, max_seq_len=None) -> dict:
    torch.manual_seed(seed)
    max_seq_len = max_seq_len or seq_len
    model = MQARModel(mqar_config(mixer, d_model, vocab, max_seq_len, layout=layout, **FEATURES.get(mixer, {})))
    x_train, y_train = generate_mqar(steps * batch, seq_len, pairs, vocab, 0.01, seed=1)
    x_test, y_test = generate_mqar(500, seq_len, pairs, vocab, 0.01, seed=2)
    p_train, t_train = query_positions(y_train)
    p_test, t_test = query_positions(y_test)
    decay = [p for p in model.parameters() if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    rest = [p for p in model.parameters() if not (p.dim() >= 2 and not getattr(p, "_no_weight_decay", False))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))

    def logits(x, pos):
        h = model.hidden(x)
        return model.head(h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1])))

    @torch.no_grad()
    def accuracy():
        model.eval()
        acc = (logits(x_test, p_test).argmax(-1) == t_test).float().mean().item()
        model.train()
        return acc

    curve, losses, start = [{"step": 0, "loss": None, "acc": accuracy()}], [], time.perf_counter()
    for step in range(steps):
        sl = slice(step * batch, (step + 1) * batch)
        loss = F.cross_entropy(logits(x_train[sl], p_train[sl]).flatten(0, 1), t_train[sl].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": round(sum(losses) / len(losses), 4), "acc": accuracy()})
            losses = []
    return {
        "mixer": mixer, "layout": layout, "d_model": d_model, "lr": lr, "steps": steps, "batch": batch,
        "vocab": vocab, "seq_len": seq_len, "max_seq_len": max_seq_len, "pairs": pairs, "state_size": model.state_size(seq_len),
        "params": sum(p.numel() for p in model.parameters()), "final_acc": curve[-1]["acc"],
        "seconds": round(time.perf_counter() - start, 1), "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mixers", nargs="+", default=["h3", "hyena"])
    ap.add_argument("--layouts", nargs="+", default=["paper", "conv_hybrid"])
    ap.add_argument("--d-models", nargs="+", type=int, default=[64])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="the model's max_position_embeddings (Hyena's l_max; figure 2: 1024); default --seq-len")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    key = lambda r: (r["mixer"], r["layout"], r["d_model"], r["lr"], r["steps"], r["vocab"], r["pairs"],
                     r.get("max_seq_len", r["seq_len"]))
    done = {key(json.loads(l)) for l in out.read_text().splitlines() if l.strip()} if out.exists() else set()
    for lr in args.lrs:
        for d in args.d_models:
            for mixer in args.mixers:
                for layout in args.layouts:
                    max_len = args.max_seq_len or args.seq_len
                    if (mixer, layout, d, lr, args.steps, args.vocab, args.pairs, max_len) in done:
                        continue
                    row = run(mixer, layout, d, lr, args.steps, args.batch, args.vocab, args.seq_len, args.pairs,
                              args.eval_every, max_seq_len=max_len)
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(mixer, layout, d, lr, "acc", row["final_acc"], "loss", row["curve"][-1]["loss"],
                          f"{row['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
