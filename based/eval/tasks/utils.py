"""Loaders and the metric of the based_* lm-eval tasks (the YAML files beside this one point here)."""
from __future__ import annotations

import datasets

from based.eval.recall import contains, load_examples


def _load(task: str, metadata: dict) -> datasets.DatasetDict:
    key = f"{task}_path"
    if not metadata.get(key):
        raise ValueError(
            f"based_{task} reads a local JSONL file: pass --metadata '{{\"{key}\": \"/path/to/{task}.jsonl\"}}'"
        )
    rows = [{"prompt": e.prompt, "answers": e.answers, "line": e.line} for e in load_examples(metadata[key])]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_swde(**metadata) -> datasets.DatasetDict:
    return _load("swde", metadata)


def load_fda(**metadata) -> datasets.DatasetDict:
    return _load("fda", metadata)


def load_squad_completion(**metadata) -> datasets.DatasetDict:
    return _load("squad_completion", metadata)


def process_results(doc: dict, results: list[str]) -> dict:
    return {"contains": float(contains(results[0], doc["answers"]))}
