"""Load a saved model directory and its tokenizer for evaluation, with errors that say what is missing."""
from __future__ import annotations

import contextlib
import json
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


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" bar or load report from transformers: our errors below say what matters."""
    from transformers.utils import logging

    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _describe(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_config_file(path: Path) -> None:
    """config.json must be a JSON object; a ValueError names the file otherwise."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: not a saved model directory (pass a directory written by "
            "save_pretrained; convert reference checkpoints with `based convert` first)"
        )
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): restore it from the run that wrote it") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object of config fields, not a {type(cfg).__name__}")


def _check_weight_files(path: Path) -> None:
    """Every safetensors file's header must parse and cover the file (an empty or truncated file does not)."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as e:  # noqa: BLE001  (SafetensorError has no public base class to name)
            raise ValueError(
                f"{file} is not a readable safetensors file, empty or truncated ({e}): copy it again"
            ) from None


def load_model(path: str | Path, model_class=None, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` (default AutoModelForCausalLM, local files only) that
    refuses what transformers would only warn about: missing tensors (left at random init), unexpected
    ones and shape mismatches. Every problem is a FileNotFoundError or ValueError naming the file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import based  # noqa: F401  registers the "based" model type with the Auto classes

    path = Path(path)
    if path.is_file():  # a weights file named instead of its folder: "not found" would mislead
        raise FileNotFoundError(f"checkpoint {path} is a file: pass the directory that holds it and its config.json")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    check_config_file(path)
    model_class = model_class or AutoModelForCausalLM
    config_class = AutoConfig if model_class is AutoModelForCausalLM else model_class.config_class
    with _quiet_transformers():
        try:
            config = config_class.from_pretrained(path, local_files_only=True)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        _check_weight_files(path)
        try:
            model, info = model_class.from_pretrained(
                path, config=config, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs,
            )
        except OSError as e:  # no weights file at all
            raise FileNotFoundError(f"{path}: {e}") from None
    problems = [
        f"{what} tensors: {_describe(info[key])}"
        for what, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"))
        if info.get(key)
    ]
    if info.get("mismatched_keys"):
        shapes = [f"{k} {tuple(a)} (config.json says {tuple(b)})" for k, a, b in info["mismatched_keys"]]
        problems.append(f"tensors of the wrong shape: {_describe(shapes)}")
    if problems:
        raise ValueError(
            f"the weights in {path} do not match its config.json ({'; '.join(problems)}): a damaged or "
            "mismatched checkpoint; copy it again or pass the matching config.json"
        )
    return model


def load_checkpoint(
    path: str | Path, tokenizer: str | Path | None = None, device: str | None = None, dtype: str = "auto"
):
    """(model, tokenizer) from a save_pretrained directory: a BASED checkpoint, or any Hugging Face causal
    LM saved locally; the tokenizer comes from `tokenizer` or else from the same directory."""
    path = Path(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(path, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    tok = load_tokenizer(tokenizer or path)
    vocab = model.config.vocab_size
    if len(tok) > vocab:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary only {vocab}")
    return model, tok
