"""`based train`: train or resume a model (`torchrun --nproc-per-node N -m based train ...` for DDP/FSDP2).

Fields of based.train.TrainConfig map one to one onto flags (--max-steps is max_steps). Flags left
unset take TrainConfig's defaults, which depend on the preset (see based/train/config.py).
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from based.models import PRESETS

    p = sub.add_parser(
        "train", help="train a model on a corpus (default: the built-in one); `based train --help`",
        description="Train or resume a BASED / Transformer++ model. With no --data, the built-in corpus (the "
                    "Python standard library's documentation) and a BPE trained on it are used: "
                    "`based train --preset debug --out runs/debug` trains on a CPU in a few minutes.",
    )
    p.add_argument("--out", required=True, help="run folder: metrics, checkpoints, final model and tokenizer")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=PRESETS, help="model preset (default: debug)")
    model.add_argument("--config", help="JSON of BasedConfig fields (optionally \"preset\": NAME plus overrides)")
    p.add_argument("--data", help="text/JSONL/Parquet file or folder, or a datasets save_to_disk folder "
                                  "(default: built-in corpus)")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer folder (default: train a BPE on the corpus)")
    p.add_argument("--tokenizer-vocab", type=int, help="size of the BPE trained when no --tokenizer is given")
    p.add_argument("--text-field", help="JSONL key / Parquet or datasets column holding the text")
    p.add_argument("--val-fraction", type=float, help="share of tokens held out for validation")
    p.add_argument("--max-steps", type=int, help="optimizer steps (the LR schedule's length)")
    p.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint, schedule unchanged")
    p.add_argument("--batch-size", type=int, help="sequences per micro-step, summed over all processes")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-tokens", type=int, help="validation tokens per evaluation")
    p.add_argument("--save-every", type=int)
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (under torchrun)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each block and the loss (the first step compiles; checkpoints are the "
                        "same with or without it, so a run resumes either way)")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="fp32 on GPU")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for MFU (default: known GPUs)")
    p.add_argument("--sample-prompt", help="prompt of the greedy sample printed at the end")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from based.data.corpus import DataError
    from based.train import TrainConfig, TrainError, train
    from based.train.checkpoint import CheckpointError

    given = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and v is not None}
    try:
        train(TrainConfig(**given))
    except (DataError, TrainError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0
