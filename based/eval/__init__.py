"""Evaluation: perplexity over a corpus, the paper's recall-intensive tasks (SWDE, FDA, SQuAD-completion),
and an lm-evaluation-harness adapter (based.eval.harness, needs the `eval` extra)."""
from .checkpoint import load_checkpoint, load_tokenizer
from .perplexity import evaluate_perplexity
from .recall import TASKS, contains, evaluate_recall, generate_until, load_examples, wilson_interval

__all__ = [
    "load_checkpoint", "load_tokenizer", "evaluate_perplexity",
    "TASKS", "contains", "evaluate_recall", "generate_until", "load_examples", "wilson_interval",
]
