"""Checkpoints: one self-contained folder per saved step, written atomically.

OUT/checkpoints/step-0000100/
    config.json, model.safetensors      BasedForCausalLM.from_pretrained(this folder) loads it
    tokenizer.json, tokenizer_config.json  AutoTokenizer.from_pretrained(this folder) loads it
    trainer.pt                          optimizer, LR scheduler, RNG states, data position, run config

The folder is written as OUT/checkpoints/.tmp-step-..., each file fsynced, then renamed: a process killed
at any moment leaves either a complete checkpoint or none. Model and optimizer state are gathered as
full (unsharded) tensors keyed by parameter name, so a checkpoint written by one process, DDP or FSDP2
resumes on any other world size.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import DistInfo, barrier

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TIED_HEAD = "lm_head.weight"
# What save_checkpoint writes into trainer.pt and resuming reads (with train_config, read with .get).
_TRAINER_KEYS = {"step", "samples_seen", "tokenizer", "optimizer", "scheduler", "rng"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def special_token_ids(tokenizer) -> dict:
    """bos / eos / pad ids for config.json and generation_config.json. A tokenizer without a pad token
    pads with eos (GPT-2's convention), so batched `generate` and `pipeline` need no set-up."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def write_model(path: Path, model_state: dict, config, tokenizer) -> None:
    """config.json + generation_config.json + model.safetensors + modeling_based.py (+ tokenizer files)
    into the existing folder `path`; the tied LM head is left out, as save_pretrained does, and restored from the embedding
    on load. With a tokenizer, its bos / eos / pad ids go into both configs (Hugging Face `generate` stops
    at eos_token_id and pads with pad_token_id) and the saved tokenizer gets eos as its pad token if it
    has none, left padding, and the default chat template (based.serve.text.default_chat_template) if it has none."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from ..models.modeling import write_remote_code

    tensors = {k: v.detach().contiguous() for k, v in model_state.items()
               if not (config.tie_word_embeddings and k == _TIED_HEAD)}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["BasedForCausalLM"]
    if tokenizer is not None:
        ids = special_token_ids(tokenizer)
        for name, value in ids.items():
            setattr(config, name, value)
        GenerationConfig(**ids).save_pretrained(path)
        needs_pad = tokenizer.pad_token is None and tokenizer.eos_token is not None
        needs_template = getattr(tokenizer, "chat_template", None) is None
        # Prompts of a batch must end together for generation (prefill refuses right padding): saved left-padding,
        # `model.generate(**tok(prompts, padding=True, return_tensors="pt"))` works with no set-up.
        needs_left = tokenizer.padding_side != "left"
        if needs_pad or needs_template or needs_left:
            tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer stays as it was
        if needs_pad:
            tokenizer.pad_token = tokenizer.eos_token
        if needs_left:
            tokenizer.padding_side = "left"
            tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
        if needs_template:
            # The template `based serve` falls back to, written down so that transformers' apply_chat_template
            # and every other chat client render the same prompt.
            from ..serve.text import default_chat_template

            tokenizer.chat_template = default_chat_template()
        tokenizer.save_pretrained(path)
    config.save_pretrained(path)
    write_remote_code(path)  # as BasedForCausalLM.save_pretrained: loadable with trust_remote_code alone


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, config, tokenizer, trainer_state: dict,
                    info: DistInfo, keep: int) -> Path:
    """Gather (all ranks: collectives under DDP/FSDP), write (rank 0) and prune to the newest `keep`."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # unsharded, on CPU, rank 0
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    root = out / CHECKPOINTS
    final = root / f"step-{step:07d}"
    if info.is_main:
        tmp = root / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_model(tmp, model_state, config, tokenizer)
        state = {**trainer_state, "step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "rng": rng_state()}
        torch.save(state, tmp / TRAINER_STATE)
        _fsync_tree(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[:-keep]:
            _remove(old)
    barrier(info)
    return final


def _remove(ckpt: Path) -> None:
    """Delete a checkpoint folder: renamed to a .tmp- name first (atomic), so a kill during the deletion
    leaves a half-deleted folder that clean_partial removes, never a `step-N` missing files."""
    doomed = ckpt.with_name(f".tmp-deleting-{ckpt.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def clean_partial(out: Path) -> None:
    """Remove temporary folders a killed run left behind."""
    root = out / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(model state, trainer state, config.json as a dict); CheckpointError when unreadable."""
    from safetensors.torch import load_file

    try:
        config = json.loads((path / "config.json").read_text())
        model_state = load_file(str(path / "model.safetensors"))
        trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, overwritten or missing files fail in many ways, all fatal here
        raise CheckpointError(
            f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {e}); delete that folder to "
            f"resume from the previous checkpoint"
        ) from None
    # A file that loads but holds something else (another program's trainer.pt, a hand-edited config.json)
    # would fail later with a KeyError or AttributeError: refused here, with the same advice.
    missing = sorted(_TRAINER_KEYS - set(trainer_state)) if isinstance(trainer_state, dict) else None
    if not isinstance(config, dict) or missing != []:
        what = (f"config.json holds a JSON {type(config).__name__}, not an object" if not isinstance(config, dict)
                else f"{TRAINER_STATE} holds a {type(trainer_state).__name__}, not a trainer state" if missing is None
                else f"{TRAINER_STATE} lacks {', '.join(missing)}")
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete ({what}); delete that folder to resume "
                              f"from the previous checkpoint")
    return model_state, trainer_state, config


def load_into(model, optimizer, scheduler, model_state: dict, trainer_state: dict, config) -> None:
    """Restore model, optimizer, scheduler and RNG (every rank; shards where the model is sharded)."""
    if config.tie_word_embeddings and _TIED_HEAD not in model_state:
        model_state[_TIED_HEAD] = model_state["transformer.embeddings.word_embeddings.weight"]
    opts = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, model_state, options=opts)
        set_optimizer_state_dict(model, optimizer, trainer_state["optimizer"], options=opts)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"the checkpoint does not fit this model or optimizer: {e}") from None
    try:
        scheduler.load_state_dict(trainer_state["scheduler"])
        set_rng_state(trainer_state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's scheduler or RNG state is corrupt ({type(e).__name__}: {e}); "
                              f"delete that checkpoint folder to resume from the previous one") from None
