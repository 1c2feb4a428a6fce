"""The `based` command: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _report(args: argparse.Namespace) -> int:
    """Build a preset, run a forward pass on built-in text and print parameters and decode-state sizes."""
    import torch

    from based import BasedConfig, BasedForCausalLM

    torch.manual_seed(args.seed)
    config = BasedConfig.from_preset(args.preset)
    model = BasedForCausalLM(config).eval()
    # Built-in data: this package's own docstring, byte-encoded and folded into the vocabulary.
    text = (sys.modules["based"].__doc__ or "based") * 64
    ids = torch.tensor([list(text.encode())[: args.seq_len]]) % config.vocab_size
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, labels=ids)
        elapsed = time.perf_counter() - start
    lengths = [args.seq_len, 4 * args.seq_len, 16 * args.seq_len]
    report = {
        "preset": args.preset,
        "parameters": model.num_parameters(),
        "layer_types": config.layer_types,
        "forward": {"tokens": ids.shape[1], "seconds": round(elapsed, 4), "loss": round(out.loss.item(), 4)},
        "decode_state_bytes_fp32": {str(L): model.inference_state_bytes(L, dtype=torch.float32) for L in lengths},
    }
    print(json.dumps(report, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.what == "ops":
        from based.bench.ops import main as bench_ops

        return bench_ops(args.rest) or 0
    raise AssertionError(args.what)


def build_parser() -> argparse.ArgumentParser:
    from based.models import PRESETS

    parser = argparse.ArgumentParser(prog="based", description="BASED linear-attention language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("report", help="forward pass of a preset on built-in text; parameters and state sizes")
    p.add_argument("--preset", default="debug", choices=PRESETS)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_report)

    p = sub.add_parser("bench", help="benchmarks (GPU): `based bench ops [--help]`")
    p.add_argument("what", choices=["ops"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
