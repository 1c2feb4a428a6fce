"""`based convert`: HazyResearch/based checkpoints into this package's format, and back."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


# based.convert.FORMATS, named here so that building the parser does not import the converter (torch);
# tests/test_cli.py checks that the two agree.
FORMATS = ("hazyresearch",)


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert HazyResearch/based checkpoints to or from this package's format",
        description="--from hazyresearch: their pytorch_model.bin or .safetensors plus config.json -> OUT "
        "(save_pretrained layout). --to hazyresearch: our checkpoint directory -> OUT/pytorch_model.bin + "
        "OUT/config.json in their layout.",
    )
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="source", choices=FORMATS, help="read a checkpoint of this format")
    way.add_argument("--to", dest="target", choices=FORMATS, help="write our checkpoint in this format")
    p.add_argument("--checkpoint", required=True, help="their weights file (or a directory with it and "
                   "config.json); with --to, our checkpoint directory")
    p.add_argument("--config", help="their config.json (default: beside the checkpoint)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="a local tokenizer directory to save with the model (theirs is GPT-2's); "
                   "its vocabulary must fit the model's")
    p.add_argument("--dtype", choices=("keep", "float32", "bfloat16", "float16"), default="keep",
                   help="dtype of the written weights (keep: as read)")
    p.set_defaults(func=run)


def check_out(out: Path, checkpoint: Path, config: str | None) -> None:
    """--out must be a folder other than the one the checkpoint is read from: both layouts name their config
    config.json, so converting into the source folder replaced it (exit 0) and left that checkpoint unreadable."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"based convert: --out {out} is an existing file, not a folder: choose another --out")
    sources = {checkpoint if checkpoint.is_dir() else checkpoint.parent, *([Path(config).parent] if config else [])}
    if out.is_dir() and any(out.resolve() == s.resolve() for s in sources if s.exists()):
        raise SystemExit(f"based convert: --out {out} is the folder the checkpoint is read from; writing there would "
                         f"replace its config.json: choose another --out")
    if (out / "config.json").exists():  # another model's folder: it was overwritten, exit 0, and no longer loaded
        raise SystemExit(f"based convert: --out {out} already holds a checkpoint (config.json); writing there would "
                         f"replace it: choose another --out")


def run(args: argparse.Namespace) -> int:
    from based import BasedForCausalLM
    from based.convert import ConversionError, load_hazyresearch, save_hazyresearch
    from based.data.tokenizer import load_tokenizer
    from based.eval.checkpoint import DTYPES, load_model

    if args.config and not args.source:
        raise SystemExit("based convert: --config is read only with --from hazyresearch (a based checkpoint has its "
                         "own config.json): leave it out")
    check_out(Path(args.out), Path(args.checkpoint), args.config)
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        if args.source:
            model = load_hazyresearch(args.checkpoint, args.config)
        else:  # a damaged safetensors file, config.json or tensor set is one line naming it
            model = load_model(args.checkpoint, BasedForCausalLM)
        if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
            # Checked before anything is written: the pair would give ids the embedding does not have.
            raise ConversionError(
                f"--tokenizer {args.tokenizer} has {len(tokenizer)} tokens but the model's vocabulary only "
                f"{model.config.vocab_size}: pass the tokenizer the model was trained with"
            )
        if args.dtype != "keep":
            model = model.to(DTYPES[args.dtype])
        if args.source:
            model.save_pretrained(args.out)
        else:
            save_hazyresearch(model, args.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
    except (FileNotFoundError, ConversionError, ValueError, OSError) as e:
        raise SystemExit(f"based convert: {e}") from None
    summary = {
        "from": args.source or "based", "to": args.target or "based", "out": str(args.out),
        "parameters": model.num_parameters(), "dtype": str(model.dtype).removeprefix("torch."),
        "mixer_types": list(model.config.mixer_types), "tokenizer": bool(tokenizer),
    }
    print(json.dumps(summary, indent=2))
    return 0
