"""Token-level loss and perplexity of a causal LM over a corpus, sliding over long documents.

Each document is tokenized with the tokenizer's BOS token (else its EOS token) in front, so that its
first token is scored too, and every token is predicted exactly once. A document longer than max_length
is covered by windows of at most max_length tokens that advance by `stride`: a window scores only its
last `stride` predictions (the first window all of its own), so each of those sees at least
max_length - stride tokens of context. stride = max_length gives disjoint chunks.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, scored) over n prediction positions: a window feeds positions [begin, end)
    (end - begin <= max_length) and scores its last `scored`; each position is scored exactly once."""
    if max_length <= 0 or not 1 <= stride <= max_length:
        raise ValueError(f"need 1 <= stride <= max_length, got stride={stride}, max_length={max_length}")
    if n <= 0:
        return []
    end = min(max_length, n)
    out = [(0, end, end)]
    while end < n:
        new_end = min(end + stride, n)
        out.append((max(0, new_end - max_length), new_end, new_end - end))
        end = new_end
    return out


def _prefix(tokenizer) -> list[int]:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return [token_id]
    return []


def position_limit(model) -> int | None:
    """max_position_embeddings of a BASED-package model whose state grows with the context (full attention,
    Hyena), else None (BASED's own mixers have no positional limit; other models are not ours to judge)."""
    from ..generation.state import full_attention_limit

    if not hasattr(getattr(model, "transformer", None), "layers"):
        return None
    return full_attention_limit(model)


@torch.no_grad()
def evaluate_perplexity(
    model,
    tokenizer,
    documents: Iterable[str],
    max_length: int = 2048,
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Loss (nats per token), perplexity and bits per UTF-8 byte of `model` over `documents`.

    Args:
        model: a causal LM whose forward(input_ids [B, T]) returns .logits [B, T, V].
        tokenizer: a Hugging Face tokenizer.
        documents: texts, each scored on its own.
        max_length: tokens per window.
        stride: tokens a window advances (default max_length // 2).
        batch_size: windows per forward pass (right-padded, which a causal model cannot see).
    """
    stride = stride or max(1, max_length // 2)
    windows(1, max_length, stride)  # check the arguments before tokenizing
    limit = position_limit(model)
    if limit is not None and max_length > limit:  # windows past it score positions the model never had
        raise ValueError(f"max_length={max_length} exceeds this model's max_position_embeddings={limit} (full "
                         f"attention or Hyena): lower --max-length to at most {limit}")
    prefix = _prefix(tokenizer)
    docs, n_bytes = [], 0
    for text in tqdm(documents, desc="tokenizing", unit="doc", disable=not progress):
        ids = prefix + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 2:
            docs.append(torch.tensor(ids))
            n_bytes += len(text.encode("utf-8"))
    if not docs:
        raise ValueError("the corpus has no document of two or more tokens to score")
    # Inputs of a window are positions [b, e) of a document, its targets positions [b + 1, e + 1).
    jobs = [(d, *w) for d, ids in enumerate(docs) for w in windows(len(ids) - 1, max_length, stride)]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)  # little padding; the longest batch first

    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=sum(j[3] for j in jobs), desc="perplexity", unit="tok", disable=not progress)
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        T = max(e - b for _, b, e, _ in batch)
        inputs = torch.zeros(len(batch), T, dtype=torch.long)
        targets = torch.full((len(batch), T), -100, dtype=torch.long)
        for row, (d, b, e, scored) in enumerate(batch):
            inputs[row, : e - b] = docs[d][b:e]
            targets[row, e - b - scored : e - b] = docs[d][e - scored + 1 : e + 1]
        logits = model(inputs.to(device)).logits
        nll += F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten().to(device), ignore_index=-100, reduction="sum"
        ).double()
        scored = sum(j[3] for j in batch)
        n_tokens += scored
        bar.update(scored)
    bar.close()
    seconds = time.perf_counter() - start
    loss = nll.item() / n_tokens
    return {
        "documents": len(docs),
        "tokens": n_tokens,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll.item() / math.log(2) / n_bytes,
        "max_length": max_length,
        "stride": stride,
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1),
    }
