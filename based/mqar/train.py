"""Train and evaluate one MQAR model: one run of a sweep, one row of results.jsonl."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import dataclasses
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..data.mqar import IGNORE_INDEX, generate_mqar
from ..ops.cross_entropy import linear_cross_entropy
from .model import MQARModel, mqar_config

# Held around seeding the global generator and building a model from it: models started at once in threads of
# one process (`based mqar --streams`) would otherwise draw interleaved inits.
INIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class MQARTask:
    """num_examples MQAR examples of seq_len tokens with num_kv_pairs pairs."""

    seq_len: int
    num_kv_pairs: int
    num_examples: int

    @property
    def name(self) -> str:
        return f"T{self.seq_len}_kv{self.num_kv_pairs}"


@dataclass(frozen=True)
class MQARRun:
    """One model trained at one learning rate.

    Args:
        mixer: the mixer under test (a BasedConfig mixer type).
        d_model: width.
        lr: peak AdamW learning rate (cosine decay to 0 after a linear warm-up).
        mixer_kwargs: BasedConfig fields of the mixer, e.g. {"feature_dim": 16} or {"window_size": 32}.
        train, test: tasks; training batches each come from one train task, in shuffled order.
        vocab_size, power_a: MQAR generator settings shared by all tasks.
        epochs, batch_size, weight_decay, warmup_frac: optimisation.
        seed: model init and batch order; data_seed: the examples (shared by every run of a sweep).
        layout: "paper" (figure 2's model for the mixer, the default) or "conv_hybrid" (BaseConv under
            every mixer, this package's earlier layout); see based.mqar.model.
    """

    mixer: str
    d_model: int
    lr: float
    mixer_kwargs: dict = field(default_factory=dict)
    train: tuple[MQARTask, ...] = ()
    test: tuple[MQARTask, ...] = ()
    vocab_size: int = 8192
    power_a: float = 0.01
    epochs: int = 32
    batch_size: int = 256
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    seed: int = 0
    data_seed: int = 0
    layout: str = "paper"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MQARRun":
        d = dict(d)
        d["train"] = tuple(MQARTask(**t) for t in d["train"])
        d["test"] = tuple(MQARTask(**t) for t in d["test"])
        return cls(**d)

    @property
    def run_id(self) -> str:
        """Stable hash of every setting: a resumed sweep skips runs whose id is already in results.jsonl."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def model_name(self) -> str:
        """The model without its learning rate, e.g. "linear_attn d_model=64 feature_dim=16"."""
        extra = " ".join(f"{k}={v}" for k, v in sorted(self.mixer_kwargs.items()))
        name = f"{self.mixer} d_model={self.d_model}" + (f" {extra}" if extra else "")
        return name if self.layout == "paper" else f"{name} layout={self.layout}"

    def config(self):
        max_len = max(t.seq_len for t in (*self.train, *self.test))
        return mqar_config(self.mixer, self.d_model, self.vocab_size, max_seq_len=max_len, layout=self.layout,
                           **self.mixer_kwargs)


@lru_cache(maxsize=32)
def _data(task: MQARTask, vocab_size: int, power_a: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached: every run of a sweep trains and tests on the same examples.
    return generate_mqar(task.num_examples, task.seq_len, task.num_kv_pairs, vocab_size, power_a, seed=seed)


def task_data(run: MQARRun, split: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples of run.train[i] or run.test[i]; train and test draw from different seeds."""
    task = (run.train if split == "train" else run.test)[i]
    return _data(task, run.vocab_size, run.power_a, 1000 * run.data_seed + (0 if split == "train" else 500) + i)


def decays(p: torch.Tensor) -> bool:
    """Whether AdamW decays p: matrices only, not biases, norms, or SSM dynamics marked _no_weight_decay (as
    mamba does)."""
    return p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if decays(p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def steps_per_epoch(run: MQARRun) -> int:
    return sum(math.ceil(t.num_examples / run.batch_size) for t in run.train)


def lr_factor(step: int, run: MQARRun) -> float:
    """The schedule at optimizer step `step` (from 0): linear warm-up, then cosine decay to 0 at the end."""
    total_steps = run.epochs * steps_per_epoch(run)
    warmup = max(1, int(run.warmup_frac * total_steps))
    return min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))))


def batch_order(run: MQARRun):
    """Yields (train task index, example indices [<= batch_size]) for every step of the run, in order: batches
    never mix tasks (their lengths differ); the order of all batches is shuffled per epoch, from run.seed."""
    sizes = [t.num_examples for t in run.train]
    g = torch.Generator().manual_seed(run.seed)
    batches_per_epoch = [(i, b) for i, n in enumerate(sizes) for b in range(math.ceil(n / run.batch_size))]
    for _ in range(run.epochs):
        perms = [torch.randperm(n, generator=g) for n in sizes]
        for j in torch.randperm(len(batches_per_epoch), generator=g).tolist():
            i, b = batches_per_epoch[j]
            yield i, perms[i][b * run.batch_size : (b + 1) * run.batch_size]


def query_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [N, T] with the same number Q of labelled positions per row (MQAR: one per key) ->
    positions [N, Q] (ascending) and their labels [N, Q]."""
    mask = labels != IGNORE_INDEX
    counts = mask.sum(1)
    if len(labels) and not bool((counts == counts[0]).all()):
        raise ValueError("every example must have the same number of query positions")
    positions = mask.nonzero()[:, 1].view(len(labels), -1)
    return positions, labels.gather(1, positions)


def _query_hidden(model: MQARModel, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, Q, d_model] at the query positions [B, Q] only: a gather of known size, so a
    training step never waits for the device to count masked positions (a boolean mask would)."""
    hidden = model.hidden(x)
    return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def _query_logits(model: MQARModel, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits [B, Q, vocab] at the query positions [B, Q]."""
    return model.head(_query_hidden(model, x, positions))


def query_loss(model: MQARModel, x: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss: cross-entropy of the (tied) head at the query positions, targets -100 ignored; on CUDA
    without the [B, Q, vocab] logits in memory (based.ops.cross_entropy)."""
    return linear_cross_entropy(_query_hidden(model, x, positions), model.embeddings.weight, targets)


@torch.no_grad()
def evaluate(model: MQARModel, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, device) -> float:
    """Fraction of query positions (labels != -100) where the argmax prediction is the value."""
    model.eval()
    positions, targets = query_positions(labels)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(inputs), batch_size):
        x, q, y = (t[start : start + batch_size].to(device) for t in (inputs, positions, targets))
        correct += (_query_logits(model, x, q).argmax(-1) == y).sum()
    model.train()
    return correct.item() / max(targets.numel(), 1)


@contextlib.contextmanager
def training_device(device) -> Iterator[bool]:
    """Around a run's training: on a CUDA device, TF32 matmuls (restored after) and that device made current,
    because Triton kernels launch on the current device and CUDA graphs capture there (a sweep's worker
    training on cuda:3 would otherwise launch them on cuda:0). Yields whether the device is CUDA."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    previous = torch.get_float32_matmul_precision()
    if cuda:
        torch.set_float32_matmul_precision("high")
    try:
        with torch.cuda.device(dev) if cuda else contextlib.nullcontext():
            yield cuda
    finally:
        torch.set_float32_matmul_precision(previous)


def train_mqar(run: MQARRun, device: str = "cpu") -> dict:
    """Train run's model, test it on every test task; returns one results row (JSON-serialisable).

    Weights, activations, scans and losses are fp32 on every device; on CUDA the matmuls run as TF32 (tensor
    cores). No autocast: these models are launch-bound, and casts would add kernels, not save time.
    """
    with training_device(device) as tf32:
        return {**_train_and_test(run, device), "tf32": tf32}


def check_run(run: MQARRun) -> None:
    """Settings no training can start from, named."""
    if run.epochs < 1 or run.batch_size < 1 or not run.train or not run.test:
        raise ValueError(f"MQAR run {run.model_name}: epochs and batch_size must be >= 1 and the train and test "
                         f"tasks non-empty, got epochs={run.epochs}, batch_size={run.batch_size}")


def _train_and_test(run: MQARRun, device: str) -> dict:
    start_time = time.perf_counter()
    model, loss = fit(run, device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # the steps were only queued: count the time they took
    return result_row(run, model, loss.item(), start_time, time.perf_counter() - start_time, device)


def fit(run: MQARRun, device="cpu", step_losses: list[float] | None = None,
        stop: Callable[[int], bool] | None = None) -> tuple[MQARModel, torch.Tensor]:
    """Train run's model; returns it and the last step's loss. step_losses, if given, gets every step's loss
    (a host sync per step: for tests); stop(s), if given, is asked before step s and ends training when
    true (benchmarks time the first steps of this very loop)."""
    check_run(run)
    with INIT_LOCK:
        torch.manual_seed(run.seed)
        model = MQARModel(run.config()).to(device)
    # Each task's inputs, query positions and values, moved to the device once.
    train = [(x.to(device), *(t.to(device) for t in query_positions(y)))
             for x, y in (task_data(run, "train", i) for i in range(len(run.train)))]
    optimizer = torch.optim.AdamW(_param_groups(model, run.weight_decay), lr=run.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, run))
    loss = torch.tensor(float("nan"))
    for s, (i, idx) in enumerate(batch_order(run)):
        if stop is not None and stop(s):
            break
        x, positions, targets = (t[idx.to(device)] for t in train[i])
        loss = query_loss(model, x, positions, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step_losses is not None:
            step_losses.append(loss.item())
    return model, loss.detach()


def result_row(run: MQARRun, model: MQARModel, final_loss: float, start_time: float, train_seconds: float,
               device) -> dict:
    """Test the trained model on every test task; the run's results.jsonl row."""
    accuracy = {
        task.name: evaluate(model, *task_data(run, "test", i), batch_size=run.batch_size, device=device)
        for i, task in enumerate(run.test)
    }
    lengths = sorted({t.seq_len for t in run.test})
    return {
        "run_id": run.run_id,
        "mixer": run.mixer,
        "model": run.model_name,
        "d_model": run.d_model,
        "lr": run.lr,
        "hparams": dict(run.mixer_kwargs),
        "params": sum(p.numel() for p in model.parameters()),
        # The mixer under test, values per sequence, at each test length (attention and Hyena grow with it).
        "state_size": {str(L): model.state_size(L) for L in lengths},
        "accuracy": accuracy,
        "final_train_loss": round(final_loss, 4),
        "train_steps": run.epochs * steps_per_epoch(run),
        "seconds": round(time.perf_counter() - start_time, 1),
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "run": run.to_dict(),
    }
