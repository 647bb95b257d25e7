"""Helpers shared by the Triton kernels and their launchers."""
from __future__ import annotations

import collections
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreter_on() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1: CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def as_rows(t: torch.Tensor, block_m: int = 1) -> torch.Tensor:
    """``t`` viewed as (rows, t.shape[-1]) with unit stride along the last dim.

    Any row stride is fine (slices such as ``gate_up[..., :I]`` stay views). Leading dims
    that cannot be merged into one stride, or a strided last dim, are copied: one extra
    pass, cheaper than a kernel that addresses every leading dim separately. Kernels keep
    offsets inside a tile of ``block_m`` rows in 32 bits, so a row stride too large for
    that is copied away too (only absurdly padded views hit it).
    """
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()
    try:
        rows = t.view(-1, n)
    except RuntimeError:
        rows = t.reshape(-1, n)
    if rows.shape[0] > 1 and rows.stride(0) * block_m + n >= 2**31:
        rows = rows.contiguous()
    return rows


def row_stride(t2d: torch.Tensor) -> int:
    # A (1, n) or (0, n) view may report any row stride; the kernel never steps it.
    return t2d.stride(0) if t2d.shape[0] > 1 else t2d.shape[1]


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


DeviceLimits = collections.namedtuple("DeviceLimits", "arch smem_optin sm_count")


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> DeviceLimits:
    p = torch.cuda.get_device_properties(index)
    return DeviceLimits(p.major * 10 + p.minor, p.shared_memory_per_block_optin, p.multi_processor_count)


def device_limits(device: torch.device) -> DeviceLimits | None:
    """Compute capability (as 90 for 9.0), the shared memory one block may opt in to, and
    the SM count of a CUDA device (read once per device); None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(device: torch.device, work_items: int, per_sm: int) -> int:
    """How many programs a grid-stride kernel launches: enough to fill the GPU, no more
    than there is work; on the CPU (the interpreter runs programs one after another) a few."""
    if device.type == "cuda":
        limit = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    else:
        limit = 4
    return max(1, min(work_items, limit))


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def load_rows(base, start, row_stride, local, offs_d, d_ok, row_ok, TRANSPOSED: tl.constexpr, MASKED: tl.constexpr,
              EVEN_D: tl.constexpr):
    """Rows ``start + local`` of a (rows, head dim) tensor at ``base`` with unit stride along
    the head dim, as a (rows, BLOCK_D) tile or, TRANSPOSED, as (BLOCK_D, rows); ``d_ok`` and
    ``row_ok`` are the 1-D masks of the head dims and of the rows (see load_tile). The
    block's start offset is 64-bit; offsets inside the block stay 32-bit."""
    base = base + tl.cast(start, tl.int64) * row_stride
    if TRANSPOSED:
        tile = load_tile(base + (local[None, :] * row_stride + offs_d[:, None]), d_ok[:, None], row_ok[None, :],
                         MASKED, EVEN_D)
    else:
        tile = load_tile(base + (local[:, None] * row_stride + offs_d[None, :]), d_ok[None, :], row_ok[:, None],
                         MASKED, EVEN_D)
    return tile


@triton.jit
def load_tile(ptrs, d_ok, in_range, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A tile of rows x head dims (either way round) of the attention kernels' inner loops.
    ``d_ok`` (the head dims below HEAD_DIM) and ``in_range`` (the rows before the end of the
    sequence) come shaped to broadcast over ``ptrs``. MASKED: the block may run past the
    end; EVEN_D: BLOCK_D == HEAD_DIM, no head-dim padding. Masks only what can be out of
    bounds, so the common block (unmasked, even D) is a plain vector load."""
    if MASKED:
        if EVEN_D:
            tile = tl.load(ptrs, mask=in_range, other=0.0)
        else:
            tile = tl.load(ptrs, mask=d_ok & in_range, other=0.0)
    elif EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=d_ok, other=0.0)
    return tile
