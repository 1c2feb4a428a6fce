"""TrainConfig: every knob of a training run, with defaults that depend on the model size.

Batch semantics (the same on any number of processes, so a run can resume on another world size):
`batch_size` sequences per micro-step summed over all ranks (each rank takes batch_size / world_size),
`grad_accum` micro-steps per optimizer step, so an optimizer step sees batch_size * grad_accum * seq_len
tokens whatever the world size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..data.tokenizer import MAX_VOCAB
from ..models.presets import debug_preset

# Fields left None take these values. The small presets are tuned so the README's command trains on
# the default corpus on two CPU cores in a few minutes; the large ones follow the BASED reference
# (lr 8e-4, 200 warm-up steps, T = 2048), with a per-step batch one GPU holds.
SMALL_DEFAULTS = dict(seq_len=256, batch_size=16, max_steps=300, lr=3e-3, warmup=30, eval_every=50, save_every=100)
LARGE_DEFAULTS = dict(seq_len=2048, batch_size=8, max_steps=1000, lr=8e-4, warmup=200, eval_every=200, save_every=500)


def is_small_preset(name: str | None) -> bool:
    """The debug presets (every mixer has one: debug, transformer-debug, rwkv-debug, ...) train small."""
    return name is not None and name == debug_preset(name)


@dataclass
class TrainConfig:
    out: str
    preset: str | None = None  # None (and no config): "debug"
    config: str | None = None  # JSON of BasedConfig fields, instead of a preset
    data: str | None = None  # None: the built-in corpus (Python standard library documentation)
    tokenizer: str | None = None  # None: train (once, cached) a byte-level BPE on the corpus
    tokenizer_vocab: int = 4096
    text_field: str = "text"
    val_fraction: float = 0.01
    max_steps: int | None = None  # length of the LR schedule and of the run
    stop_at: int | None = None  # stop after this step with a checkpoint, schedule unchanged
    batch_size: int | None = None
    seq_len: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (reference: 8e-4 -> 8e-5)
    warmup: int | None = None  # at most max_steps; None: the preset's, cut to max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int | None = None
    eval_tokens: int = 2**17  # validation tokens per evaluation (at most the whole split)
    save_every: int | None = None
    keep_checkpoints: int = 3
    resume: bool = False
    fsdp: bool = False
    compile: bool = False  # torch.compile each block and the loss (based.train.distributed.compile_blocks)
    grad_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    device: str | None = None  # None: cuda:LOCAL_RANK when available, else cpu
    bf16: bool = True  # bf16 autocast on GPU (the CPU always trains in fp32)
    peak_flops: float | None = None  # for MFU; None: looked up from the GPU name
    sample_prompt: str = "The"
    sample_tokens: int = 48
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with every None default filled in and every value checked."""
        values = asdict(self)
        if values["preset"] is None and values["config"] is None:
            values["preset"] = "debug"
        small = values["config"] is None and is_small_preset(values["preset"])
        defaults = SMALL_DEFAULTS if small else LARGE_DEFAULTS
        warmup_given = values["warmup"] is not None
        for name, value in defaults.items():
            if values[name] is None:
                values[name] = value
        # A default warm-up shortens to a shorter run (--max-steps 10 alone is no error); a given one is checked.
        if not warmup_given and type(values["max_steps"]) is int:
            values["warmup"] = min(values["warmup"], values["max_steps"])
        cfg = TrainConfig(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        if str(self.out) == "":  # Path("") is ".": the run would land in the working folder
            raise ValueError("out must name a folder (got an empty string)")
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every",
                     "eval_tokens", "keep_checkpoints", "tokenizer_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.tokenizer_vocab > MAX_VOCAB:
            raise ValueError(f"tokenizer_vocab={self.tokenizer_vocab} is over the bound of {MAX_VOCAB:,} tokens "
                             f"(the BPE trainer would abort trying to allocate for it): lower --tokenizer-vocab")
        if self.warmup is None or self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")
        if self.warmup > self.max_steps:  # the LR would never reach its peak; equal reaches it at the last step
            raise ValueError(f"warmup={self.warmup} is longer than the run, max_steps={self.max_steps}: the "
                             f"learning rate would never reach --lr; lower --warmup to at most --max-steps, or raise "
                             f"--max-steps")
        if not (self.lr and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        # Each of these trains on silently with a value outside its range: a grad_clip <= 0 zeroes or reverses
        # every update (the clip factor is grad_clip / norm), a negative weight decay or min_lr_ratio grows the
        # weights or climbs the loss, betas outside [0, 1) make AdamW's averages diverge.
        if not 0 < self.grad_clip <= math.inf:
            raise ValueError(f"grad_clip must be > 0 (inf: no clipping), got {self.grad_clip!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (the cosine's floor as a fraction of lr), "
                             f"got {self.min_lr_ratio!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in 0 .. 2**32 - 1 (numpy's range), got {self.seed!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        # MFU = achieved / peak: a NaN, negative or infinite peak logs NaN (invalid JSON), negative or zero MFUs.
        # The one check of it: `based train` reports this message as it is.
        if self.peak_flops is not None and not 0 < self.peak_flops < math.inf:
            raise ValueError(f"peak_flops must be > 0 and finite (FLOP/s per device), got {self.peak_flops!r}: "
                             f"give a positive --peak-flops, or leave it out to look the GPU up")
        if self.stop_at is not None and not 0 < self.stop_at <= self.max_steps:
            raise ValueError(f"stop_at must be in 1 .. max_steps={self.max_steps}, got {self.stop_at}")
        if self.preset is not None and self.config is not None:
            raise ValueError("give a preset or a config file, not both")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
