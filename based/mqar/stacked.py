"""Several MQAR runs of one model shape trained at once, as one stacked model (issue 20).

Runs that differ only in their learning rate (a sweep's 4 lrs of one model) start from the same init (same
seed) and see the same batches in the same order (same seed): only their updates differ. So their parameters
are stacked on a leading dim k, one batch is gathered for all of them, and torch.func computes the k losses
and gradients in one vmapped forward and backward: the kernels of one model, each k times as large. These
models are launch-bound (a few hundred small kernels per step), so that is nearly k runs for the price of one.

The rest of the step works on the stacked parameters flattened into one [k, P] buffer: per-run global-norm
clipping at 1.0 and AdamW (torch.optim.AdamW's arithmetic, decoupled decay on the tensors `decays` picks, the
per-run lr times the warm-up + cosine schedule), each a handful of kernels. On CUDA the whole step (batch
gather from device-resident data by a device step counter, forward, backward, clipping, AdamW, schedule) is
captured once per task (its batch shape: a short last batch is padded, its padding ignored by the loss) as a
CUDA graph and replayed, so the host launches one graph per step.

The model is used only through its parameters and forward (torch.func.functional_call), whatever the layout
mqar_config builds. Each run's row is the one train_mqar would write, plus "stacked": k; a run trained here
equals the same run trained alone up to fp32 rounding (tests/mqar/test_stacked.py).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..data.mqar import IGNORE_INDEX
from .claims import group_key
from .model import MQARModel
from .train import (
    INIT_LOCK, MQARRun, batch_order, check_run, decays, lr_factor, query_loss, query_positions, result_row,
    steps_per_epoch, task_data, training_device,
)

# torch.optim.AdamW's defaults, which train_mqar uses.
BETAS, EPS, MAX_GRAD_NORM = (0.9, 0.999), 1e-8, 1.0

# Held around graph capture and empty_cache: groups training in threads of one process (`--streams`) never
# release cached memory or capture while another captures.
CUDA_SETUP_LOCK = threading.Lock()


def stack_key(run: MQARRun) -> str:
    """Runs with the same key differ only in lr, so they train stacked."""
    return dataclasses.replace(run, lr=0.0).run_id


def group_runs(runs: list[MQARRun], max_stack: int | None = None) -> list[list[MQARRun]]:
    """The runs in groups that train stacked (at most max_stack each), in order of each group's first run."""
    groups: dict[str, list[list[MQARRun]]] = {}
    order: list[list[MQARRun]] = []
    for run in runs:
        chunks = groups.setdefault(stack_key(run), [])
        if not chunks or (max_stack is not None and len(chunks[-1]) >= max_stack):
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(run)
    return order


class _QueryLoss(nn.Module):
    """The training loss of train_mqar as a module, so functional_call can swap the model's parameters."""

    def __init__(self, model: MQARModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return query_loss(self.model, x, positions, targets)


def _forward_backward(loss_module: nn.Module, buffers: dict):
    """params (stacked on dim 0), x, positions, targets -> the k runs' gradients and losses, the batch shared.
    A closure over the module, not a method of the trainer: a trainer holding a vmap of its own bound method
    would sit in a reference cycle, and its device memory (data, graphs) would outlive it until the garbage
    collector ran (on an H100 the sweep's earlier groups then filled the card)."""

    def loss(params: dict, x: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return functional_call(loss_module, {**params, **buffers}, (x, positions, targets))

    return vmap(grad_and_value(loss), in_dims=(0, None, None, None))


class StackedTrainer:
    """k runs of one shape (group_runs) and their state on `device`: step() trains all of them one step.

    Args:
        runs: k runs with one stack_key.
        device: where to train.
        cuda_graphs: capture each batch shape's step as a CUDA graph (CUDA only).
        compile: torch.compile the vmapped forward and backward (fused elementwise work; costs compile time
            per batch shape: benchmarks/mqar_stacked.py --compile measures whether it pays).
    """

    def __init__(self, runs: list[MQARRun], device="cpu", cuda_graphs: bool = False, compile: bool = False):
        if len({stack_key(r) for r in runs}) != 1:
            raise ValueError("stacked runs must differ in lr only")
        for run in runs:
            check_run(run)
        self.runs, self.k, self.device = runs, len(runs), torch.device(device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        base = runs[0]
        with INIT_LOCK:  # the global generator: groups starting at once in threads (--streams) must not interleave
            torch.manual_seed(base.seed)  # the init of each run trained alone
            self.model = MQARModel(base.config()).to(device)
        self.loss_module = _QueryLoss(self.model)
        named = [(f"model.{n}", p) for n, p in self.model.named_parameters()]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        sizes = [p.numel() for _, p in named]
        k = self.k
        # Every run's parameters in one row of a [k, P] buffer; the forward sees per-parameter views of it.
        self.flat = torch.cat([p.detach().reshape(1, -1) for _, p in named], 1).repeat(k, 1).contiguous()
        self.params = dict(zip(self.names, (v.view(k, *s) for v, s in zip(self.flat.split(sizes, 1), self.shapes))))
        self.buffers = {f"model.{n}": b for n, b in self.model.named_buffers()}
        self.decay_mask = torch.cat([torch.full((n,), float(decays(p)), device=device)
                                     for (_, p), n in zip(named, sizes)])
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)

        # Data on the device once; every step's example indices in a [steps, batch_size] table. A short last
        # batch is padded (with example 0) to the full size and its padding rows' targets are ignored by the
        # loss, so each task has one batch shape: one CUDA graph (and one compilation) per task, not two.
        self.train = [tuple(t.to(device) for t in (x, *query_positions(y)))
                      for x, y in (task_data(base, "train", i) for i in range(len(base.train)))]
        order = list(batch_order(base))
        self.total_steps = len(order)
        self.tasks = [i for i, _ in order]
        self.sizes = [len(idx) for _, idx in order]
        table = torch.zeros(self.total_steps, base.batch_size, dtype=torch.long)
        for s, (_, idx) in enumerate(order):
            table[s, : len(idx)] = idx
        self.index_table = table.to(device)
        self.size_table = torch.tensor(self.sizes, device=device)
        self.row_ids = torch.arange(base.batch_size, device=device)

        # AdamW's per-step scalars in float64 (as torch.optim computes them), stored per step and run.
        beta1, beta2 = BETAS
        lrs = torch.tensor([r.lr for r in runs], dtype=torch.float64)
        steps = torch.arange(1, self.total_steps + 1, dtype=torch.float64)
        lr = torch.tensor([lr_factor(s, base) for s in range(self.total_steps)], dtype=torch.float64)[:, None] * lrs
        self.decay_table = (1 - lr * base.weight_decay).float().to(device)  # [steps, k]
        self.step_size_table = (lr / (1 - beta1**steps)[:, None]).float().to(device)  # [steps, k]
        self.bc2_sqrt_table = ((1 - beta2**steps) ** 0.5).float().to(device)  # [steps]
        self.step_t = torch.zeros(1, dtype=torch.long, device=device)
        self.losses = torch.full((k,), float("nan"), device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.steps_done = 0
        self.forward_backward = _forward_backward(self.loss_module, self.buffers)
        if compile:
            self.forward_backward = torch.compile(self.forward_backward)

    def _step(self, task: int) -> None:
        """One step of all k runs on the next batch, of train task `task`; only device tensors, so it can be
        captured."""
        rows = self.index_table.index_select(0, self.step_t)[0]
        x, positions, targets = (t.index_select(0, rows) for t in self.train[task])
        padding = self.row_ids >= self.size_table.index_select(0, self.step_t)  # rows past a short batch
        targets = targets.masked_fill(padding[:, None], IGNORE_INDEX)  # the loss's mean leaves them out
        grads, loss = self.forward_backward(self.params, x, positions, targets)
        g = torch.cat([grads[name].reshape(self.k, -1) for name in self.names], 1)  # [k, P]
        # torch.nn.utils.clip_grad_norm_ per run: one global norm over all of a run's gradients.
        coef = (MAX_GRAD_NORM / (g.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
        g = g * coef
        # torch.optim.AdamW (single-tensor form): decoupled decay, moments, bias-corrected update.
        beta1, beta2 = BETAS
        decay = self.decay_table.index_select(0, self.step_t).view(self.k, 1)
        self.flat.mul_(torch.where(self.decay_mask.bool(), decay, torch.ones_like(decay)))
        self.exp_avg.lerp_(g, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / self.bc2_sqrt_table.index_select(0, self.step_t)).add_(EPS)
        step_size = self.step_size_table.index_select(0, self.step_t).view(self.k, 1)
        self.flat.sub_(step_size * (self.exp_avg / denom))
        self.losses.copy_(loss.detach())
        self.step_t.add_(1)

    def _state(self) -> list[torch.Tensor]:
        return [self.flat, self.exp_avg, self.exp_avg_sq, self.step_t, self.losses]

    def _capture(self) -> None:
        """One graph per task (its batch shape), sharing one memory pool (they never run at once). Warm-up
        steps run first on a side stream, as capture needs; the state is restored after them.

        Safe beside other groups training in threads of this process (`based mqar --streams`): one capture at
        a time (CUDA_SETUP_LOCK, which empty_cache calls take too), on a stream of this trainer's own (torch's
        default capture stream is shared by all threads), in thread-local mode (the other threads' allocations
        and launches do not invalidate it)."""
        with CUDA_SETUP_LOCK:
            self._capture_locked()

    def _capture_locked(self) -> None:
        saved = [t.clone() for t in self._state()]
        try:
            first = {}
            for s, task in enumerate(self.tasks):
                first.setdefault(task, s)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for task in sorted(first):
                    for _ in range(2):  # on a step of this task: its indices fit this task's examples
                        self.step_t.fill_(first[task])
                        self._step(task)
            torch.cuda.current_stream(self.device).wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            capture = torch.cuda.Stream(self.device)
            for task in sorted(first):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=capture, capture_error_mode="thread_local"):
                    self._step(task)
                self.graphs[task] = graph
        finally:
            for t, s in zip(self._state(), saved):
                t.copy_(s)

    def step(self) -> None:
        """The next training step of all k runs."""
        task = self.tasks[self.steps_done]
        if self.cuda_graphs and not self.graphs:
            try:
                self._capture()
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # something in the model that cannot be captured: run eagerly
                warnings.warn(f"{self.runs[0].model_name}: CUDA graph capture failed ({error}); training eagerly")
                self.graphs.clear()
                self.cuda_graphs = False
        if self.cuda_graphs:
            self.graphs[task].replay()
        else:
            self._step(task)
        self.steps_done += 1

    def state_dict(self, seconds: float) -> dict:
        """Everything a resumed group needs beyond its runs (whose batch order is fixed by the seed)."""
        return {"run_ids": [r.run_id for r in self.runs], "steps_done": self.steps_done, "seconds": seconds,
                **{name: t.detach().cpu() for name, t in zip(("flat", "exp_avg", "exp_avg_sq", "losses"),
                                                             (self.flat, self.exp_avg, self.exp_avg_sq, self.losses))}}

    def load_state(self, state: dict) -> float:
        """Go on from state_dict(); returns the training seconds spent before."""
        if state["run_ids"] != [r.run_id for r in self.runs]:
            raise ValueError("this saved state belongs to other runs")
        for name in ("flat", "exp_avg", "exp_avg_sq", "losses"):
            getattr(self, name).copy_(state[name])
        self.steps_done = state["steps_done"]
        self.step_t.fill_(self.steps_done)
        return state["seconds"]

    def load_run(self, i: int) -> MQARModel:
        """The model with run i's current parameters."""
        with torch.no_grad():
            for (name, shape), p in zip(zip(self.names, self.shapes), self.model.parameters()):
                p.copy_(self.params[name][i].reshape(shape))
        return self.model


_now = time.time  # the clock a deadline is read on (tests stop it mid-run)


class Paused(Exception):
    """A stacked group stopped at the sweep's time limit, its state saved to `path` for the next call."""

    def __init__(self, runs: list[MQARRun], step: int, total: int, path: Path):
        super().__init__(f"{runs[0].model_name} ({len(runs)} lrs) paused at step {step} of {total}: {path}")
        self.runs, self.step, self.total, self.path = runs, step, total, path

    def __reduce__(self):  # from a worker process back to the sweep
        return Paused, (self.runs, self.step, self.total, self.path)


def checkpoint_path(runs: list[MQARRun], folder: str | Path) -> Path:
    """Where a paused group keeps its state: named by its runs, so only the same group resumes from it."""
    return Path(folder) / f"{group_key([r.run_id for r in runs])}.pt"


def train_stacked(runs: list[MQARRun], device="cpu", cuda_graphs: bool | None = None, deadline: float | None = None,
                  checkpoint_dir: str | Path | None = None) -> list[dict]:
    """Train the runs (one stack_key) together and test each; returns their rows, in the order of `runs`.

    cuda_graphs: capture the step as CUDA graphs (default: on CUDA). Matmuls run as TF32 on CUDA, as in
    train_mqar. deadline (time.time()) with checkpoint_dir: past it, the parameters, AdamW moments and step
    go to checkpoint_dir and Paused is raised; a later call with the same runs goes on from there.
    """
    with training_device(device) as tf32:
        start = time.perf_counter()
        trainer = StackedTrainer(runs, device, cuda_graphs=tf32 if cuda_graphs is None else cuda_graphs)
        path = None if checkpoint_dir is None else checkpoint_path(runs, checkpoint_dir)
        earlier_seconds = 0.0
        if path is not None and path.exists():
            earlier_seconds = trainer.load_state(torch.load(path, map_location=device))
        while trainer.steps_done < trainer.total_steps:
            if path is not None and deadline is not None and _now() > deadline:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(trainer.state_dict(earlier_seconds + time.perf_counter() - start), tmp)
                os.replace(tmp, path)
                raise Paused(runs, trainer.steps_done, trainer.total_steps, path)
            trainer.step()
        losses = trainer.losses.tolist()  # waits for the queued steps
        train_seconds = earlier_seconds + time.perf_counter() - start
        trainer.graphs.clear()  # their memory pool back, for the evaluation at lengths up to 1024
        if trainer.device.type == "cuda":
            with CUDA_SETUP_LOCK:  # never during another thread's capture
                torch.cuda.empty_cache()
        rows = []
        for i, run in enumerate(runs):
            row = result_row(run, trainer.load_run(i), losses[i], start - earlier_seconds, train_seconds, device)
            rows.append({**row, "tf32": tf32, "stacked": len(runs), "cuda_graphs": trainer.cuda_graphs})
        if path is not None:
            path.unlink(missing_ok=True)
        return rows


__all__ = ["Paused", "StackedTrainer", "group_runs", "stack_key", "steps_per_epoch", "train_stacked"]
