"""Batch-1 decode, three decoders made one after another in one process (1.3b, bf16, CUDA graph), each timed
over 3 x 1008 steps: as benchmarks/decode_b1.py steps them, as based bench generate does (compile=True, the
token log read every 32 steps by run_steps), and the first kind again.

    python benchmarks/first_decoder.py results.json

It located why the benchmark's batch-1 row was above decode_b1.py's: the first decoder made in a process
was the slower one, whichever kind (results/decode-b1-first-decoder-h200-2026-11-29.json).
"""
import json
import sys

import torch

from based.bench.generate import LOG_LEN, build, elapsed_ms, run_steps
from based.generation import Decoder

STEPS, REPEATS = 1008, 3
DECODERS = [  # (name, Decoder keyword arguments), in the order they are made
    ("decode_b1", dict(max_seq_len=512 + 16 + REPEATS * STEPS + 1)),
    ("bench", dict(max_seq_len=1536, compile=True, log_len=LOG_LEN)),
    ("decode_b1_again", dict(max_seq_len=512 + 16 + REPEATS * STEPS + 1)),
]


def main(path: str) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build("1.3b", torch.bfloat16, device)
    prompt = torch.randint(0, model.config.vocab_size, (1, 512), device=device)
    res = {}
    for name, kw in DECODERS:
        d = Decoder(model, 1, **kw)
        d.add(prompt)
        out = torch.empty(1, REPEATS * STEPS + 16, dtype=torch.long, device=device)
        for _ in range(16):
            d.step()
        torch.cuda.synchronize()
        ms = []
        for r in range(REPEATS):
            if name == "bench":
                ms.append(elapsed_ms(device, lambda: run_steps(d, out, r * STEPS, (r + 1) * STEPS)) / STEPS)
            else:
                def f():
                    for _ in range(STEPS):
                        d.step()
                ms.append(elapsed_ms(device, f) / STEPS)
        res[name] = ms
        print(name, ms, flush=True)
        del d
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
