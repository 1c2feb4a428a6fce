"""The training loop: one explicit loop in the style of nanoGPT, parallelism applied from outside.

    data     corpus -> tokenizer -> packed memmap (based.data), cached and shared by every rank
    model    BasedForCausalLM from a preset or a config file, vocabulary sized from the tokenizer
    step     grad_accum micro-batches (bf16 autocast on GPU), clip, AdamW, warmup + cosine LR
    logs     OUT/metrics.jsonl each step, validation loss / perplexity every eval_every steps
    saves    OUT/checkpoints/step-N every save_every steps and at the end; the final model and
             tokenizer also land in OUT itself, so `from_pretrained(OUT)` and `based generate` load it

Exact resume: batches are a pure function of (seed, samples consumed) and a checkpoint holds every
other piece of state (weights, AdamW moments, scheduler, RNG), so stop-and-resume logs the same losses
as an uninterrupted run; bit for bit on the CPU.
"""
from __future__ import annotations

import contextlib
import filecmp
import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpus import DataError, resolve_corpus
from ..data.packed import WindowSampler, check_splits, num_windows, pack_corpus, windows
from ..data.tokenizer import resolve_tokenizer, tokenizer_fingerprint, vocab_size
from ..generation.state import full_attention_limit
from ..models import BasedConfig, BasedForCausalLM
from ..models.config import unknown_field_message
from . import distributed
from .checkpoint import (
    CheckpointError,
    clean_partial,
    list_checkpoints,
    load_into,
    read_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import (
    DistInfo, all_reduce_sum, barrier, compile_blocks, gradient_sync, parallelize, setup, teardown,
)
from .flops import flops_per_token, peak_flops
from .lock import RunLock, RunLocked
from .metrics import MetricsLog, plot_losses

# TrainConfig fields that may differ between a run and its resumption without being recorded as a change:
# they say how the command runs, not what is trained.
# Not settings of the training itself: a run folder moved or named by another path ("runs/a" vs "./runs/a")
# resumes the same run.
_NOT_SETTINGS = ("out", "resume", "stop_at", "progress", "sample_prompt", "sample_tokens")

class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


def model_fields() -> list[str]:
    """The BasedConfig fields that define a model (what a resumed run must match)."""
    return list(BasedConfig.__annotations__)


def _bookkeeping_keys() -> set[str]:
    """Keys transformers writes into a config.json beside the model's fields (model_type, architectures,
    transformers_version, ...): a --config copied from a checkpoint may hold them; they are ignored."""
    from transformers import PretrainedConfig

    return set(PretrainedConfig().to_dict()) | {"auto_map", "torch_dtype", "use_cache"}


def build_model_config(cfg: TrainConfig, n_vocab: int) -> BasedConfig:
    """The preset, or the config file, with vocab_size from the tokenizer. A config file that sets
    vocab_size forces it: the tokenizer must then fit in it."""
    if cfg.config is None:
        return BasedConfig.from_preset(cfg.preset, vocab_size=n_vocab)
    path = Path(cfg.config)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise TrainError(f"cannot read model config {path} (--config): {e}") from None
    if not isinstance(raw, dict):
        raise TrainError(f"model config {path} (--config) holds a JSON {type(raw).__name__}; it must be an object "
                         f'of BasedConfig fields, e.g. {{"preset": "debug", "d_model": 32}}')
    valid = BasedConfig.field_names() | {"preset"}
    for key in raw:
        if key not in valid and key not in _bookkeeping_keys():
            raise TrainError(f"model config {path} (--config): {unknown_field_message(key, valid)}")
    preset = raw.pop("preset", None)
    fields = {k: v for k, v in raw.items() if k in valid}  # drops transformers' bookkeeping
    forced = fields.get("vocab_size")
    if forced is None:
        fields["vocab_size"] = n_vocab
    elif n_vocab > forced:
        raise DataError(
            f"the tokenizer has {n_vocab} tokens but {path} sets vocab_size={forced}: ids >= {forced} would have "
            f"no embedding; remove vocab_size from the config (it is then taken from the tokenizer) or raise it"
        )
    return BasedConfig.from_preset(preset, **fields) if preset else BasedConfig(**fields)


def check_resumable(ckpt: Path, saved: dict, config: BasedConfig, trainer_state: dict, tok_hash: str) -> None:
    """CheckpointError unless the checkpoint holds this model (same config) and tokenizer."""
    now = config.to_dict()
    diffs = {k: (saved.get(k), now.get(k)) for k in model_fields() if saved.get(k) != now.get(k)}
    if diffs:
        shown = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diffs.items())
        raise CheckpointError(
            f"{ckpt} holds a model with another config ({shown}): resume with the preset/config and tokenizer "
            f"of that run, or train into another --out"
        )
    if trainer_state.get("tokenizer") != tok_hash:
        raise CheckpointError(f"{ckpt} was trained with another tokenizer: pass that run's --data/--tokenizer")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters a mixer marks `_no_weight_decay` (Mamba's A_log, ...: decaying them erases
    memory). Read before FSDP2 wraps the model: its sharded parameters do not carry the mark."""
    return {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}


def param_groups(model: nn.Module, weight_decay: float, exempt: set[str] | None = None) -> list[dict]:
    """Weight decay on matrices only: norms, biases, embeddings (with the tied LM head) and the
    parameters named in `exempt` (default: no_weight_decay_names of this model) are exempt."""
    exempt = no_weight_decay_names(model) if exempt is None else exempt
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights come once
        if p.requires_grad:
            skip = id(p) in embeddings or name.removeprefix("module.") in exempt  # "module.": DDP's wrapper
            (decay if p.dim() >= 2 and not skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_schedule(warmup: int, max_steps: int, min_ratio: float):
    """LR multiplier for optimizer step s (0-based): linear warm-up, then cosine down to min_ratio."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32: logits [B, T, V], targets [B, T]. Compiled, the upcast, the softmax
    and the loss are fused: no fp32 copy of the [B * T, V] logits is written."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction)


def loss_function(compile: bool, backend: str | None = None):
    """cross_entropy, compiled when asked (for the trainer and the training benchmark)."""
    if not compile:
        return cross_entropy
    return torch.compile(cross_entropy, backend=backend or distributed.COMPILE_BACKEND, dynamic=False)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean",
          loss_fn=cross_entropy) -> torch.Tensor:
    return loss_fn(model(x).logits, y, reduction)  # logits [B, T, V]


@torch.no_grad()
def evaluate(model, val: np.ndarray, seq_len: int, local_bs: int, max_windows: int, info: DistInfo,
             autocast, loss_fn=cross_entropy) -> float:
    """Mean token loss over the first max_windows validation windows. Windows go round-robin to ranks and
    every rank runs the same number of batches (padding windows weigh 0), as FSDP's collectives need."""
    n = min(num_windows(val, seq_len), max_windows)
    mine = list(range(info.rank, math.ceil(n / info.world_size) * info.world_size, info.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    for b in range(0, len(mine), local_bs):
        ids = mine[b : b + local_bs]
        real = torch.tensor([j < n for j in ids], dtype=torch.float64, device=info.device)
        x, y = windows(val, [j if j < n else 0 for j in ids], seq_len)
        with autocast:
            loss = _loss(model, x.to(info.device), y.to(info.device), "none", loss_fn).view(len(ids), -1)
        total += torch.stack([(loss.double().sum(1) * real).sum(), real.sum() * seq_len])
    all_reduce_sum(total, info)
    return (total[0] / total[1]).item()


@torch.no_grad()
def greedy_sample(model: BasedForCausalLM, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt`: Hugging Face `generate` where the model has it (based.generation),
    else one prefill and one recurrent decode step per token."""
    from transformers import GenerationMixin

    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    if ids.numel() == 0:
        ids = torch.tensor([[tokenizer.eos_token_id or 0]], device=device)
    limit = full_attention_limit(model)
    if limit is not None:  # a sample must not fail a finished run: the prompt's end and fewer tokens then
        max_new_tokens = min(max_new_tokens, limit // 2)
        ids = ids[:, -(limit - max_new_tokens):]
    eos = tokenizer.eos_token_id
    if isinstance(model, GenerationMixin):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t != eos]
        return prompt + tokenizer.decode(new)
    state = model.allocate_inference_cache(1, max_seq_len=ids.shape[1] + max_new_tokens)
    logits = model(ids, state=state).logits[:, -1]
    new = []
    for t in range(max_new_tokens):
        token = logits.argmax(-1)
        if token.item() == eos:
            break
        new.append(token.item())
        logits = model.step(token, state, ids.shape[1] + t)
    return prompt + tokenizer.decode(new)


def _prepare_data(cfg: TrainConfig, info: DistInfo):
    """Tokenizer and packed corpus; rank 0 builds what is missing while the others wait, then reuse it."""
    tokenizer = packed = None
    for main_turn in (True, False):
        if info.is_main == main_turn:
            tokenizer = resolve_tokenizer(cfg.tokenizer, cfg.data, cfg.text_field, cfg.tokenizer_vocab)
            packed = pack_corpus(resolve_corpus(cfg.data), tokenizer, cfg.text_field, cfg.val_fraction,
                                 progress=cfg.progress and info.is_main)
        barrier(info)
    return tokenizer, packed


def _model_files(ckpt: Path) -> list[Path]:
    return sorted(f for f in ckpt.iterdir() if f.name != "trainer.pt")


def is_exported(ckpt: Path, out: Path) -> bool:
    """Whether OUT holds the model and tokenizer files of checkpoint `ckpt` (copies keep the modification
    time, so an exported file is recognised from its size and time without reading it)."""
    return all((out / f.name).is_file() and filecmp.cmp(f, out / f.name, shallow=True) for f in _model_files(ckpt))


def _export(ckpt: Path, out: Path) -> None:
    """Copy a checkpoint's model and tokenizer files into OUT (each file atomically). Done after every
    checkpoint, and at any start that finds OUT behind the newest one (a kill between the two): OUT's
    model is always the newest checkpoint's."""
    for f in _model_files(ckpt):
        tmp = out / f".tmp-{f.name}"
        shutil.copy2(f, tmp)
        tmp.replace(out / f.name)


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, numpy's MemoryError."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def apply_optimizer_settings(optimizer, scheduler, cfg: TrainConfig) -> None:
    """After a checkpoint is loaded: this run's --lr, --weight-decay and beta1 / beta2 replace the ones saved
    with AdamW's state (the schedule's shape, --warmup / --max-steps / --min-lr-ratio, and --grad-clip are
    read from this run's config anyway), so what run.json records is what runs. With the same settings nothing changes:
    the LR is recomputed by the scheduler's own expression."""
    factor = scheduler.lr_lambdas[0]
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):  # param_groups' order
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["weight_decay"] = decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def settings_changed(saved: dict, cfg: TrainConfig) -> dict:
    """{field: [value in the checkpoint's run, value now]} for the settings a resumed run changes (fields
    newer than the checkpoint are not compared: its run had no such setting)."""
    now = asdict(cfg)
    return {k: [saved[k], v] for k, v in now.items() if k not in _NOT_SETTINGS and k in saved and saved[k] != v}


def _write_run_json(out: Path, cfg: TrainConfig, info: DistInfo, n_params: int, start: int, changed: dict) -> None:
    """OUT/run.json: the settings in force from this start on; `changes` lists every resumption that
    changed a setting (the step it took effect after, {field: [before, after]}), earlier ones kept."""
    path = out / "run.json"
    changes = []
    if start > 0 and path.exists():
        try:
            changes = [c for c in json.loads(path.read_text()).get("changes", []) if c.get("step", 0) < start]
        except (ValueError, AttributeError):
            changes = []
    if changed:
        changes.append({"step": start, "changed": changed})
    record = {**asdict(cfg), "world_size": info.world_size, "parameters": n_params, "start_step": start,
              "changes": changes}
    tmp = out / ".tmp-run.json"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def _load_quietly(path: Path) -> BasedForCausalLM:
    """from_pretrained without transformers' "Loading weights" bar, which adds nothing after training."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return BasedForCausalLM.from_pretrained(path)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary of the last step. Rank 0 holds
    OUT/train.lock throughout (based.train.lock): a second trainer on the same OUT is refused."""
    cfg = cfg.resolved()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is an existing file, not a folder: choose another --out")
    info = setup(cfg.device)
    lock = RunLock(out) if info.is_main else None
    try:
        if lock is not None:
            try:
                lock.acquire()
            except RunLocked as e:
                raise TrainError(str(e)) from None
            except OSError as e:  # a path under a file, no permission, a read-only filesystem
                raise TrainError(f"cannot create and lock the run folder --out {out}: {e}") from None
            if lock.took_over:
                held = lock.took_over
                print(f"taking over {lock.path} from pid {held.get('pid')} (started {held.get('started')}), "
                      f"which is no longer running")
        return _train(cfg, info)
    finally:
        if lock is not None:
            lock.release()
        teardown()


def _train(cfg: TrainConfig, info: DistInfo) -> dict:
    out, T, K = Path(cfg.out), cfg.seq_len, cfg.grad_accum
    if cfg.batch_size % info.world_size:
        raise TrainError(f"batch_size={cfg.batch_size} (summed over ranks) is not divisible by {info.world_size} ranks")
    local_bs = cfg.batch_size // info.world_size
    say = print if info.is_main else (lambda *a, **k: None)

    build_model_config(cfg, 1)  # a bad --config fails now, not after the corpus is tokenized
    tokenizer, packed = _prepare_data(cfg, info)
    check_splits(packed, T)
    n_vocab, tok_hash = vocab_size(tokenizer), tokenizer_fingerprint(tokenizer)
    config = build_model_config(cfg, n_vocab)

    checkpoints = list_checkpoints(out)
    if checkpoints and not cfg.resume:
        raise TrainError(f"{out} already holds checkpoints (latest {checkpoints[-1].name}): pass --resume to "
                         f"continue that run, or choose another --out")
    ckpt = checkpoints[-1] if cfg.resume and checkpoints else None
    if cfg.resume and ckpt is None:
        say(f"--resume: no checkpoint in {out} yet, starting at step 0")
    if ckpt is not None:
        model_state, trainer_state, saved_config = read_checkpoint(ckpt)
        check_resumable(ckpt, saved_config, config, trainer_state, tok_hash)
        if info.is_main and not is_exported(ckpt, out):  # killed between the checkpoint and its export
            _export(ckpt, out)
            say(f"exported {ckpt.name}, the newest checkpoint, to {out}")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = BasedForCausalLM(config).to(info.device)
    n_params = model.num_parameters()
    limit = full_attention_limit(model)
    if limit is not None and T > limit:
        raise TrainError(
            f"--seq-len {T} exceeds this model's max_position_embeddings={limit} (full attention or Hyena; "
            f"generation refuses longer sequences): lower --seq-len to at most {limit}, or raise "
            f"max_position_embeddings with --config (a JSON with \"preset\" and \"max_position_embeddings\")")
    if cfg.grad_checkpointing:  # before compile and DDP / FSDP wrap the blocks
        # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        try:
            enable()
        except ValueError as e:
            raise TrainError(f"--grad-checkpointing: {e}") from None
    if cfg.compile:  # before DDP / FSDP wrap the blocks, as torchtitan does
        compile_blocks(model)
    exempt = no_weight_decay_names(model)
    model = parallelize(model, info, cfg.fsdp)
    loss_fn = loss_function(cfg.compile)
    cuda = info.device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, exempt), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.warmup, cfg.max_steps, cfg.min_lr_ratio))
    start, cursor, changed = 0, 0, {}
    if ckpt is not None:
        try:
            load_into(model, optimizer, scheduler, model_state, trainer_state, config)
        except CheckpointError as e:  # load_into does not know the folder: name it
            raise CheckpointError(f"{ckpt}: {e}") from None
        apply_optimizer_settings(optimizer, scheduler, cfg)
        start, cursor = trainer_state["step"], trainer_state["samples_seen"]
        changed = settings_changed(trainer_state.get("train_config", {}), cfg)
        del model_state, trainer_state
        say(f"resumed from {ckpt} (step {start})")
    end = cfg.stop_at or cfg.max_steps
    if start >= end:
        say(f"{out} is already at step {start} (of {end}): nothing to do")
        return {"out": str(out), "step": start, "loss": None, "val_loss": None, "checkpoint": str(ckpt), "sample": None}
    if changed:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        say(f"--resume: from step {start + 1} on, {shown} (recorded in run.json)")

    metrics = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)
        _write_run_json(out, cfg, info, n_params, start, changed)
        metrics = MetricsLog(out / "metrics.jsonl", start if ckpt is not None else None)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.bf16 else contextlib.nullcontext()
    sampler = WindowSampler(packed.train, T, cfg.seed)
    tokens_per_step = cfg.batch_size * K * T
    flops_tok = flops_per_token(config, T, n_params)
    peak = cfg.peak_flops or peak_flops(info.device)
    say(f"model: {n_params:,} parameters, vocab {n_vocab}; data: {len(packed.train):,} train / "
        f"{len(packed.val):,} val tokens ({packed.path}); {tokens_per_step:,} tokens per step on "
        f"{info.world_size} process(es), {info.device.type}")

    from tqdm import tqdm

    bar = tqdm(total=end, initial=start, unit="step", disable=not (info.is_main and cfg.progress),
               dynamic_ncols=True)
    last_ckpt, row, val_loss, t_run = ckpt, {}, None, time.perf_counter()
    step = start
    try:
        for step in range(start + 1, end + 1):
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=info.device)
            for micro in range(K):
                x, y = sampler.batch(cursor + info.rank * local_bs, local_bs)
                cursor += cfg.batch_size
                with gradient_sync(model, micro == K - 1):
                    with autocast:
                        loss = _loss(model, x.to(info.device), y.to(info.device), loss_fn=loss_fn)
                    (loss / K).backward()
                loss_sum += loss.detach()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            loss_t = all_reduce_sum(loss_sum / K, info) / info.world_size
            loss_val, norm_val = loss_t.item(), grad_norm.item()
            if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
                bar.close()
                if metrics:
                    metrics.close()
                where = (f"the last good checkpoint is {last_ckpt} (resume from it with --resume and a lower --lr, "
                         f"which applies from the resumed step on)" if last_ckpt else
                         "no checkpoint was written yet (start again with a lower --lr)")
                raise TrainError(f"loss is {loss_val} (grad norm {norm_val}) at step {step}: stopped before updating "
                                 f"the weights; {where}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt
            mfu = flops_tok * tps / (peak * info.world_size) if peak else None
            row = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": norm_val, "tokens": cursor * T,
                   "tokens_per_s": round(tps, 1), "mfu": None if mfu is None else round(mfu, 4),
                   "time": round(time.perf_counter() - t_run, 3)}
            if metrics:
                metrics.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")

            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val_loss = evaluate(model, packed.val, T, local_bs, max(1, cfg.eval_tokens // T), info, autocast,
                                    loss_fn)
                if metrics:
                    metrics.write({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 80))})
                if info.is_main:
                    bar.write(f"step {step}: train loss {loss_val:.4f}, val loss {val_loss:.4f}, "
                              f"val perplexity {math.exp(min(val_loss, 80)):.2f}")
            if step % cfg.save_every == 0 or step == end:
                state = {"samples_seen": cursor, "tokenizer": tok_hash, "train_config": asdict(cfg),
                         "world_size": info.world_size}
                last_ckpt = save_checkpoint(out, step, model, optimizer, scheduler, config, tokenizer, state, info,
                                            cfg.keep_checkpoints)
                if info.is_main:
                    _export(last_ckpt, out)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        bar.close()
        if metrics:
            metrics.close()
        raise TrainError(
            f"out of memory at step {step} on {info.device} with --batch-size {cfg.batch_size} (x --seq-len {T}): "
            f"lower --batch-size (raising --grad-accum keeps the tokens per step) or --seq-len"
        ) from None
    bar.close()

    summary = {"out": str(out), "step": end, "loss": row.get("loss"), "val_loss": val_loss,
               "checkpoint": str(last_ckpt) if last_ckpt else None, "sample": None}
    if metrics:
        metrics.close()
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    if end == cfg.max_steps and info.is_main and last_ckpt is not None:
        final = _load_quietly(out).to(info.device).eval()
        summary["sample"] = greedy_sample(final, tokenizer, cfg.sample_prompt, cfg.sample_tokens)
        wall = time.perf_counter() - t_run
        say(f"done in {wall:.0f} s: train loss {summary['loss']:.4f}, val loss {val_loss:.4f}; model and tokenizer "
            f"in {out} (metrics.jsonl, loss.png, checkpoints/)")
        say(f"greedy sample: {summary['sample']!r}")
    barrier(info)
    return summary
