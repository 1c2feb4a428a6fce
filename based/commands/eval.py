"""`based eval`: perplexity over a corpus, or a recall-intensive task (SWDE, FDA, SQuAD-completion)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import out_folder_problem

TASKS = ("perplexity", "swde", "fda", "squad_completion")
MAX_LENGTH = 2048  # tokens per perplexity window unless a full-attention model has fewer positions


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity or recall-task accuracy of a checkpoint",
        description="Perplexity over a corpus (text, JSONL, Parquet, HF datasets dir), or a recall task on a "
        'local JSONL file ({"text": prompt, "value": answer} per line). Writes OUT/TASK.json (and for recall '
        "tasks OUT/TASK_predictions.jsonl) and prints the report.",
    )
    p.add_argument("--checkpoint", required=True, help="directory written by save_pretrained")
    p.add_argument("--task", required=True, choices=TASKS, help="what to measure")
    p.add_argument("--data", required=True, help="corpus path (perplexity) or JSONL file (recall tasks)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--out", default="eval-results", help="output directory")
    p.add_argument("--batch-size", type=int, default=8, help="windows (perplexity) or prompts (recall) per forward")
    p.add_argument("--limit", type=int, help="evaluate only the first N documents or examples")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations; auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument("--max-length", type=int, help=f"tokens per window (default: {MAX_LENGTH}, or a full-attention "
                                                    "model's max_position_embeddings where that is smaller)")
    ppl.add_argument("--stride", type=int, help="tokens a window advances (default max-length / 2)")
    ppl.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    rec = p.add_argument_group("recall tasks")
    rec.add_argument("--max-new-tokens", type=int, default=48,
                     help="greedy tokens generated per answer, 1 .. 2**31 - 1 (based serve's bound on max_tokens)")
    rec.add_argument("--plot", action="store_true", help="also draw OUT/TASK_by_length.png (accuracy by length)")
    p.set_defaults(func=run)


def _positive(**values) -> None:
    for name, v in values.items():
        if v is not None and v <= 0:
            raise SystemExit(f"based eval: --{name.replace('_', '-')} must be positive, got {v}")


def run(args: argparse.Namespace) -> int:
    from itertools import islice

    from based.cli import torch_device
    from based.data.corpus import iter_documents, resolve_corpus
    from based.eval import checkpoint, evaluate_perplexity, evaluate_recall, load_examples
    from based.eval.perplexity import position_limit
    from based.eval.recall import plot_accuracy_by_length

    _positive(batch_size=args.batch_size, limit=args.limit, max_length=args.max_length, stride=args.stride,
              max_new_tokens=args.max_new_tokens)
    from based.generation.state import MAX_NEW_TOKENS

    if args.max_new_tokens > MAX_NEW_TOKENS:  # 10**12 ran on without end where no answer reached its newline
        raise SystemExit(f"based eval: --max-new-tokens must be at most {MAX_NEW_TOKENS} (2**31 - 1, as based serve's "
                         f"max_tokens), got {args.max_new_tokens}: lower --max-new-tokens (answers take a few tokens)")
    if args.plot and args.task == "perplexity":
        raise SystemExit("based eval: --plot draws recall accuracy by length; it has no meaning for perplexity")
    problem = out_folder_problem(args.out)  # before the evaluation: its results were lost with a traceback
    if problem:
        raise SystemExit(f"based eval: {problem}")
    out = Path(args.out)
    try:
        torch_device(args.device)
        if args.task == "perplexity":
            corpus = resolve_corpus(args.data)
        else:
            examples = load_examples(args.data)[: args.limit]
        model, tokenizer = checkpoint.load_checkpoint(args.checkpoint, args.tokenizer, args.device, args.dtype)
        progress = not args.no_progress
        if args.task == "perplexity":
            docs = islice(iter_documents(corpus, args.text_field), args.limit)
            limit = position_limit(model)
            max_length = args.max_length or min(MAX_LENGTH, limit or MAX_LENGTH)
            report = evaluate_perplexity(model, tokenizer, docs, max_length, args.stride, args.batch_size, progress)
            records = None
        else:
            report, records = evaluate_recall(
                model, tokenizer, examples, args.task, args.batch_size, args.max_new_tokens, progress
            )
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise SystemExit(f"based eval: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    report = {"task": args.task, "checkpoint": str(args.checkpoint), "data": str(args.data), **report}
    if records is not None:
        report["predictions"] = str(out / f"{args.task}_predictions.jsonl")
        with open(report["predictions"], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if args.plot:
            title = f"{args.task}: {report['accuracy']:.1%} of {report['examples']}"
            plot = plot_accuracy_by_length(report["by_length"], out / f"{args.task}_by_length.png", title)
            report["plot"] = str(plot)
    (out / f"{args.task}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0
