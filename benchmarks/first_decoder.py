"""Batch-1 decode, three decoders made one after another in one process (1.3b, bf16, CUDA graph), each timed
over 3 x 1008 steps: as benchmarks/decode_b1.py steps them, as based bench generate does (compile=True, the
token log read every 32 steps by run_steps), and the first kind again.

    python benchmarks/first_decoder.py results.json

It located why the benchmark's batch-1 row was above decode_b1.py's: the first decoder made in a process
was the slower one, whichever kind (results/decode-b1-first-decoder-h200-2026-11-29.json).
"""
import json, sys, torch
from based.bench.generate import build, elapsed_ms, run_steps, LOG_LEN
from based.generation import Decoder
torch.manual_seed(0)
model = build("1.3b", torch.bfloat16, torch.device("cuda"))
prompt = torch.randint(0, model.config.vocab_size, (1, 512), device="cuda")
res = {}
for name, kw in [("decode_b1", dict(max_seq_len=512 + 16 + 3 * 1008 + 1)), ("bench", dict(max_seq_len=1536, compile=True, log_len=LOG_LEN)),
                 ("decode_b1_again", dict(max_seq_len=512 + 16 + 3 * 1008 + 1))]:
    d = Decoder(model, 1, **kw)
    d.add(prompt)
    out = torch.empty(1, 3 * 1008 + 16, dtype=torch.long, device="cuda")
    for _ in range(16):
        d.step()
    torch.cuda.synchronize()
    ms = []
    for r in range(3):
        if name == "bench":
            ms.append(elapsed_ms(torch.device("cuda"), lambda: run_steps(d, out, r * 1008, (r + 1) * 1008)) / 1008)
        else:
            def f():
                for _ in range(1008):
                    d.step()
            ms.append(elapsed_ms(torch.device("cuda"), f) / 1008)
    res[name] = ms
    print(name, ms, flush=True)
    del d
json.dump(res, open(sys.argv[1], "w"), indent=1)
