"""Process group set-up and model wrapping, kept out of the model code (torchtitan's `parallelize`).

`torchrun --nproc-per-node N -m based train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; NCCL on GPUs,
gloo on the CPU. DDP replicates the model; --fsdp shards every block and the root (embedding, final
norm, tied LM head) with FSDP2 `fully_shard`. Several machines: the same command under torchrun's
rendezvous (--nnodes, --rdzv-endpoint); checkpoints go to --out, which must be shared storage.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; pick this process' device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# What --compile compiles with. BASED_COMPILE_BACKEND=aot_eager traces the same graphs and autograd
# without generating code: to tell a tracing problem from an Inductor one, and for fast CPU tests.
COMPILE_BACKEND = os.environ.get("BASED_COMPILE_BACKEND", "inductor")


def compile_blocks(model: nn.Module, backend: str | None = None) -> nn.Module:
    """torch.compile each block in place (torchtitan's per-block compile), before DDP/FSDP wrap it.

    Blocks of one mixer type share their compiled graphs (parameters are graph inputs), so compile
    time does not grow with depth. `Module.compile` keeps the module tree, so state-dict keys carry no
    `_orig_mod.`: checkpoints load with or without compile. Inside a block the Triton Taylor attention
    and the FlexAttention block mask run eagerly between graphs (torch.compiler.disable in based.ops);
    norms, SwiGLU, rotary, the short conv and the residuals are fused by Inductor. Shapes are static:
    a new batch shape (e.g. validation's last batch) compiles once more.
    """
    import torch._dynamo.config as dynamo_config

    # Graphs per mixer type (split where a graph breaks) times grad modes and input shapes: past the
    # default limit of 8 per code object Dynamo would run the rest eagerly, with only a warning.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    for block in model.transformer.layers:
        block.compile(backend=backend or COMPILE_BACKEND, dynamic=False)
    return model


def parallelize(model: nn.Module, info: DistInfo, fsdp: bool) -> nn.Module:
    """DDP, FSDP2 or the model itself (one process)."""
    if fsdp:
        if not info.distributed:
            return model  # sharding over one process is the plain model
        from torch.distributed.fsdp import fully_shard

        # The logits are a view (the padded vocabulary sliced off); the loss reads them out of place, so
        # FSDP2's warning about in-place ops on a view output does not apply.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        for block in model.transformer.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The BasedForCausalLM inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return getattr(model, "module", model)


def gradient_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
