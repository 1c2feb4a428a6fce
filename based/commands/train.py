"""`based train`: train or resume a model (`torchrun --nproc-per-node N -m based train ...` for DDP/FSDP2).

Fields of based.train.TrainConfig map one to one onto flags (--max-steps is max_steps). Flags left
unset take TrainConfig's defaults, which depend on the preset (see based/train/config.py).
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from based.commands import PRESETS

    p = sub.add_parser(
        "train", help="train a model on a corpus (default: the built-in one); `based train --help`",
        description="Train or resume a BASED / Transformer++ model. With no --data, the built-in corpus (the "
                    "Python standard library's documentation) and a BPE trained on it are used: "
                    "`based train --preset debug --out runs/debug` trains on a CPU in a few minutes.",
    )
    p.add_argument("--out", required=True, help="run folder: metrics, checkpoints, final model and tokenizer")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=PRESETS, metavar="PRESET", help="model preset (default: debug): %(choices)s")
    model.add_argument("--config", help="JSON of BasedConfig fields (optionally \"preset\": NAME plus overrides)")
    p.add_argument("--data", help="text/JSONL/Parquet file or folder, or a datasets save_to_disk folder "
                                  "(default: built-in corpus)")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer folder (default: train a BPE on the corpus)")
    p.add_argument("--tokenizer-vocab", type=int,
                   help="size of the BPE trained when no --tokenizer is given (default: 4096)")
    p.add_argument("--text-field", help="JSONL key / Parquet or datasets column holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, help="share of tokens held out for validation (default: 0.01)")
    p.add_argument("--max-steps", type=int,
                   help="optimizer steps, the LR schedule's length (default: 300 with a *debug preset, else 1000)")
    p.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint, schedule unchanged")
    p.add_argument("--batch-size", type=int,
                   help="sequences per micro-step over all processes (default: 16 with a *debug preset, else 8)")
    p.add_argument("--seq-len", type=int,
                   help="tokens per sequence (default: 256 with a *debug preset, else 2048)")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default: 1)")
    p.add_argument("--lr", type=float,
                   help="peak learning rate (default: 0.003 with a *debug preset, else 0.0008)")
    p.add_argument("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (default: 0.1)")
    p.add_argument("--warmup", type=int,
                   help="linear warm-up steps, at most --max-steps; left unset, cut to --max-steps "
                        "(default: 30 with a *debug preset, else 200)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0.1)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient's global norm to this (default: 1.0)")
    p.add_argument("--seed", type=int, help="seed of the initial weights and the data order (default: 0)")
    p.add_argument("--eval-every", type=int,
                   help="steps between validation losses (default: 50 with a *debug preset, else 200)")
    p.add_argument("--eval-tokens", type=int, help="validation tokens per evaluation (default: 131072)")
    p.add_argument("--save-every", type=int,
                   help="steps between checkpoints (default: 100 with a *debug preset, else 500)")
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept in --out (default: 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out; optimizer flags given now (--lr, --warmup, "
                        "--weight-decay, ...) apply from the resumed step on and are recorded in run.json")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (under torchrun)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each block and the loss (the first step compiles; checkpoints are the "
                        "same with or without it, so a run resumes either way)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute each block's activations in the backward pass: less memory, about a third "
                        "more compute (Hugging Face gradient_checkpointing_enable)")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="fp32 on GPU")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for MFU (default: known GPUs)")
    p.add_argument("--sample-prompt", help="prompt of the greedy sample printed at the end (default: The)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from based.data.corpus import DataError
    from based.train import TrainConfig, TrainError, train
    from based.train.checkpoint import CheckpointError

    from based.cli import torch_device
    from based.commands import out_folder_problem

    # Before the corpus is tokenized: '' would train into the working folder, a path under a file fails late.
    # (Field values, --peak-flops and --warmup among them, are TrainConfig.check's: train() checks them first.)
    problem = out_folder_problem(args.out)
    if problem:
        raise SystemExit(f"error: {problem}")
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and v is not None}
    try:
        if args.device is not None:  # None: cuda:LOCAL_RANK under torchrun (based.train.distributed.setup)
            torch_device(args.device)
        train(TrainConfig(**given))
    except (DataError, TrainError, CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0
