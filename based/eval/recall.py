"""Recall-intensive evaluation (BASED paper, section 6): SWDE, FDA and SQuAD-completion.

The reference protocol: the prompt (whitespace-stripped) ends where the answer should start; the model
generates greedily up to 48 tokens and stops at a newline; the generation, cut at its first newline, is
correct when it contains the gold answer, case-insensitively (metric "contains").

Local data, JSONL, one example a line (the fields of the public hazyresearch/based-* data sets first):
    prompt: the first present of "text", "prompt", "context"
    answer: the first present of "value", "answer", "answers": a string, a list of strings (any one
            counts) or a SQuAD-style {"text": [...]}
Other fields are ignored.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

TASKS = ("swde", "fda", "squad_completion")
PROMPT_FIELDS = ("text", "prompt", "context")
ANSWER_FIELDS = ("value", "answer", "answers")
MAX_NEW_TOKENS = 48


@dataclass
class RecallExample:
    prompt: str
    answers: list[str]
    line: int


def _answers(value, where: str, field: str) -> list[str]:
    if isinstance(value, dict) and "text" in value:  # SQuAD: {"text": [...], "answer_start": [...]}
        value = value["text"]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f'{where}: field "{field}" must be a string or a list of strings, got {value!r}')
    values = [v.strip() for v in values if v.strip()]
    if not values:
        raise ValueError(f'{where}: field "{field}" holds no non-empty answer')
    return values


def parse_example(row: dict, where: str, line: int = 0) -> RecallExample:
    """One example from a record with a prompt and an answer field (see the module doc)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt_field = next((f for f in PROMPT_FIELDS if f in row), None)
    if prompt_field is None:
        raise ValueError(f"{where}: no prompt field: expected one of {PROMPT_FIELDS}, found {sorted(row)}")
    answer_field = next((f for f in ANSWER_FIELDS if f in row), None)
    if answer_field is None:
        raise ValueError(f"{where}: no answer field: expected one of {ANSWER_FIELDS}, found {sorted(row)}")
    prompt = row[prompt_field]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f'{where}: field "{prompt_field}" must be a non-empty string')
    return RecallExample(prompt.strip(), _answers(row[answer_field], where, answer_field), line)


def load_examples(path: str | Path) -> list[RecallExample]:
    """Examples of a local JSONL file; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    examples = []
    with path.open("rb") as f:  # lines decoded one by one, so that a bad byte is reported with its line
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{i}: not UTF-8 text (a binary file, or text in another encoding): "
                                 f"convert it to UTF-8 JSONL") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            examples.append(parse_example(row, f"{path}:{i}", i))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def contains(generation: str, answers: Sequence[str]) -> bool:
    """The paper's metric: some gold answer is a case-insensitive substring of the generation."""
    text = generation.lower()
    return any(a.strip().lower() in text for a in answers)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, center - half), min(1.0, center + half))


class StopOnStrings(StoppingCriteria):
    """Per-sequence stop once the text generated after the first `prompt_len` tokens holds a stop string."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate_until(
    model, tokenizer, prompts: Sequence[str | list[int]], stop: Sequence[str] = ("\n",),
    max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8, max_prompt_tokens: int | None = None,
    progress: bool = True, **generate_kwargs,
) -> list[tuple[str, int]]:
    """Generations (greedy unless generate_kwargs say otherwise), each cut before its first stop string,
    with the prompts' token counts.

    Prompts (texts, or token ids) are batched by length and left-padded; `model.generate` (Hugging Face)
    gets the attention mask, a stop-string criterion and max_new_tokens. max_prompt_tokens keeps only
    the last tokens of longer prompts.
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(): generation tasks need Hugging Face generate")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to left-pad batches with")
    device = next(model.parameters()).device
    encoded = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in prompts]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    if any(not ids for ids in encoded):
        raise ValueError("a prompt has no tokens")
    generate_kwargs = {"do_sample": False, **generate_kwargs}
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    out: list[tuple[str, int] | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        T = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(encoded[i])
            input_ids[r, T - n :] = torch.tensor(encoded[i])
            attention_mask[r, T - n :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, stop, T)]),
            pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **generate_kwargs,
        )
        for r, i in enumerate(rows):
            text = tokenizer.decode(generated[r, T:], skip_special_tokens=True)
            for s in stop:
                text = text.split(s)[0] if s else text
            out[i] = (text, len(encoded[i]))
    return out


def accuracy_by_length(records: Sequence[dict], bins: int = 8) -> list[dict]:
    """Accuracy over up to `bins` groups of about equal size by prompt length in tokens (a length is
    never split between two groups)."""
    ranked = sorted(records, key=lambda r: r["prompt_tokens"])
    target = math.ceil(len(ranked) / bins)
    groups: list[list[dict]] = [[]]
    for r in ranked:
        if len(groups[-1]) >= target and r["prompt_tokens"] != groups[-1][-1]["prompt_tokens"]:
            groups.append([])
        groups[-1].append(r)
    out = []
    for group in groups:
        k = sum(r["correct"] for r in group)
        out.append({
            "min_tokens": group[0]["prompt_tokens"], "max_tokens": group[-1]["prompt_tokens"],
            "examples": len(group), "accuracy": k / len(group), "ci95": list(wilson_interval(k, len(group))),
        })
    return out


def evaluate_recall(
    model, tokenizer, examples: Sequence[RecallExample], task: str = "recall", batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Accuracy ("contains") with its 95% Wilson interval, and one record per example."""
    start = time.perf_counter()
    answers = generate_until(
        model, tokenizer, [e.prompt for e in examples], ("\n",), max_new_tokens, batch_size, progress=progress
    )
    records = [
        {"line": e.line, "prompt_tokens": n, "answers": e.answers, "generation": g, "correct": contains(g, e.answers)}
        for e, (g, n) in zip(examples, answers)
    ]
    k = sum(r["correct"] for r in records)
    report = {
        "task": task, "examples": len(records), "correct": k, "accuracy": k / len(records),
        "ci95": list(wilson_interval(k, len(records))), "max_new_tokens": max_new_tokens,
        "by_length": accuracy_by_length(records), "seconds": round(time.perf_counter() - start, 3),
    }
    return report, records


def plot_accuracy_by_length(by_length: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """A PNG of accuracy (with 95% intervals) against prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [(b["min_tokens"] + b["max_tokens"]) / 2 for b in by_length]
    y = [b["accuracy"] for b in by_length]
    err = [[a - b["ci95"][0] for a, b in zip(y, by_length)], [b["ci95"][1] - a for a, b in zip(y, by_length)]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
    ax.set_xlabel("prompt length (tokens, bin midpoint)")
    ax.set_ylabel('accuracy ("contains")')
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
