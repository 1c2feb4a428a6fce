"""Programmatic dependent launch (PDL) for the decode kernels of small batches.

At batch 1 a decode step is ~180 short kernels, each of which would otherwise start only when the one
before it has finished, and then wait a memory round trip for its first loads. Launched with PDL (Hopper
and newer), a kernel starts while the one before it drains: the part before `wait_for_inputs` may read
only what no recent kernel writes (weights), and the call then lets the next kernel start in turn. Every
kernel before a kernel's wait has passed its own wait, so all kernels two back have finished: the chain
never reads unfinished writes.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENABLED = os.environ.get("BASED_PDL", "1") != "0"  # BASED_PDL=0 turns it off (for comparisons)


def interpreted() -> bool:
    """Triton kernels run under TRITON_INTERPRET=1 (the CPU tests), read when asked: tests set it at import."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def pdl_supported(device_index: int | None = None) -> bool:
    """Hopper or newer, a Triton that launches with PDL, and not the interpreter."""
    if interpreted() or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def sm_count(device_index: int | None = None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_sms(device: torch.device) -> int:
    """SMs to size a persistent or split grid for: the device's, or 2 under the interpreter (the CPU tests),
    which runs programs one after another, milliseconds each."""
    if interpreted() or device.type != "cuda":
        return 2
    return sm_count(device.index)


def pdl_options(device: torch.device, programs: int | None = None) -> dict:
    """Launch options for a kernel with a PDL constexpr: {"launch_pdl": True} where supported and (when
    programs is given) the grid is at most one program per SM, i.e. a small-batch decode kernel. A big grid
    gains nothing, and its successor's early programs would hold SM slots it needs."""
    use = (ENABLED and device.type == "cuda" and pdl_supported(device.index)
           and (programs is None or programs <= sm_count(device.index)))
    return {"launch_pdl": True} if use else {}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under PDL: wait for the previous kernel's writes, then let the next kernel start."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


TICKETS = 4096  # counters per buffer: the split kernels use one per (sequence, head) or row, at small batch
_tickets: dict = {}


def ticket_counters(device: torch.device, n: int) -> torch.Tensor:
    """n int32 zeros for the atomic tickets of a split kernel, whose last program per ticket puts its counter
    back to 0. The buffer is kept and reused, so a launch needs no fill kernel before it (at batch 1 a fill
    would cost its own launch and cut the PDL overlap of the kernels around it). One buffer per (device,
    stream): the launches of one stream run one after another, two streams may run at once. A buffer first
    made while a CUDA graph is captured is made (and zeroed) by that graph, whose pool it then stays in.
    Graphs captured on one stream share its buffer: replaying two of them at once on two streams would race,
    so `Decoder` captures each graph on a stream from torch's pool, not on the shared capture stream."""
    if n > TICKETS:
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _tickets:
        _tickets[key] = torch.zeros(TICKETS, dtype=torch.int32, device=device)
    return _tickets[key][:n]
