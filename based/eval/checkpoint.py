"""Load a saved model directory and its tokenizer for evaluation, with errors that say what is missing."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"no usable tokenizer in {path} ({e.__class__.__name__}): pass --tokenizer DIR, a directory written "
            "by a Hugging Face tokenizer's save_pretrained"
        ) from None


def load_checkpoint(
    path: str | Path, tokenizer: str | Path | None = None, device: str | None = None, dtype: str = "auto"
):
    """(model, tokenizer) from a save_pretrained directory: a BASED checkpoint, or any Hugging Face causal
    LM saved locally; the tokenizer comes from `tokenizer` or else from the same directory."""
    from transformers import AutoModelForCausalLM

    import based  # noqa: F401  registers the "based" model type with the Auto classes

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: not a saved model directory (convert reference checkpoints with "
            "`based convert` first)"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    tok = load_tokenizer(tokenizer or path)
    vocab = model.config.vocab_size
    if len(tok) > vocab:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary only {vocab}")
    return model, tok
