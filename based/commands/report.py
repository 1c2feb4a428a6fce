"""`based report`: build a preset, run a forward pass on built-in text, print parameters and state sizes."""
from __future__ import annotations

import argparse
import json
import time


def register(sub) -> None:
    from based.commands import PRESETS

    p = sub.add_parser("report", help="forward pass of a preset on built-in text; parameters and decode-state sizes")
    p.add_argument("--preset", default="debug", choices=PRESETS, metavar="PRESET",
                   help="model preset, random weights: %(choices)s")
    p.add_argument("--seq-len", type=int, default=256, help="tokens of built-in text in the forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import based
    from based import BasedConfig, BasedForCausalLM
    from based.cli import check_seed
    from based.generation.state import full_attention_limit

    if args.seq_len <= 0:
        raise SystemExit(f"--seq-len must be positive, got {args.seq_len}")
    try:
        check_seed(args.seed)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.manual_seed(args.seed)
    config = BasedConfig.from_preset(args.preset)
    model = BasedForCausalLM(config).eval()
    limit = full_attention_limit(model)
    if limit is not None and args.seq_len > limit:  # past it, positions the model never saw (and T^2 work)
        raise SystemExit(f"--seq-len {args.seq_len} exceeds {args.preset}'s max_position_embeddings={limit} "
                         f"(full attention or Hyena): lower --seq-len to at most {limit}")
    # Built-in data: this package's own docstrings as bytes, folded into the vocabulary.
    text = (" ".join(m.__doc__ or "" for m in (based, based.ops, based.layers, based.models)) * 64).encode()
    if args.seq_len > len(text):  # (it ran the whole text and reported that many tokens, exit 0)
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the built-in text's {len(text)} tokens: lower --seq-len "
                         f"to at most {len(text)}")
    ids = torch.tensor([list(text)[: args.seq_len]]) % config.vocab_size
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, labels=ids)
        elapsed = time.perf_counter() - start
    lengths = [args.seq_len, 4 * args.seq_len, 16 * args.seq_len]
    report = {
        "preset": args.preset,
        "parameters": model.num_parameters(),
        "mixer_types": list(config.mixer_types),
        "forward": {"tokens": ids.shape[1], "seconds": round(elapsed, 4), "loss": round(out.loss.item(), 4)},
        "decode_state_bytes": {str(L): model.inference_state_bytes(L) for L in lengths},
    }
    print(json.dumps(report, indent=2))
    return 0
