"""A decode token's attention over the KV arena, split over the columns (flash-decoding), in two Triton kernels.

A decode token has one query per head. Folded per key head (`rsd.engine.forward`), that is a handful of query rows per
(row, key head), and SDPA's memory-efficient kernel gives each such pair one thread block that walks every column
alone: at one row the 1.5B draft's 2 key heads keep 2 of an H200's 132 SMs busy, and its attention took 0.97 ms of
a 3.04 ms decode token (`benchmarks/decode_kernels.py`, docs/benchmarks.md). Here each (row, key head) pair's
columns are split into chunks, enough of them to fill the card; each chunk's program keeps a running softmax
over its columns (the `mask` read directly, no additive bias built), and a second kernel merges the chunks.

`split_attention_problem` says why a call cannot run here (no CUDA, no Triton, a head size that is not a power of
two, an unsupported dtype); `rsd.engine.forward` then keeps SDPA. It also keeps SDPA by default for float32 weights:
the kernels run them exactly (IEEE products), but they were measured in half precision only. With
`TRITON_INTERPRET=1` the kernels run on the CPU through Triton's interpreter: that is how the tests check them
without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

BLOCK_COLUMNS = 64  # columns one program reads per iteration
PROGRAMS_PER_SM = 2  # chunks are made until about this many programs per SM run
MAX_SPLITS = 32  # the merge holds every chunk of a head at once: [chunks, head_dim] floats in one program
# A masked score is -1e30 in the kernels (a literal: they read no globals): finite, so that a chunk with no visible
# column keeps a finite running maximum and exp(max - max) stays a number.
HALF_DTYPES = (torch.bfloat16, torch.float16)  # the dtypes the decoder picks these kernels for by default


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def dependent_launches(device: torch.device) -> bool:
    """Whether kernels on `device` launch as programmatic dependents (Hopper and later, a Triton that has them): a
    kernel's programs start while the kernel before it finishes, and wait for its results (`gdc_wait`) only before
    reading them. A decode token's small kernels each lose a launch and a ramp: a 1.5B model's token took 5% less
    on an H100 (`benchmarks/decode_kernels.py`). Off by the same test everywhere else (the interpreter, older cards)."""
    if device.type != "cuda" or interpreting() or not triton_available():
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def launch_options(device: torch.device) -> dict[str, Any]:
    """A kernel launch's `PDL` switch and, where dependent launches run, Triton's option for them."""
    pdl = dependent_launches(device)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def split_attention_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why `split_attention` cannot run for these tensors, or None."""
    if not triton_available():
        return "Triton is not installed (it comes with torch's CUDA wheels)"
    if device.type != "cuda" and not interpreting():
        return f"its kernels run on CUDA devices, not {device.type} (TRITON_INTERPRET=1 runs them on the CPU)"
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"the head size {head_dim} is not a power of two of at least 16"
    if dtype not in (*HALF_DTYPES, torch.float32):
        return f"{dtype} weights: the kernels multiply bfloat16, float16 or float32"
    return None


def split_count(pairs: int, width: int, sms: int) -> int:
    """Chunks per (row, key head) pair: enough programs for every SM to run `PROGRAMS_PER_SM`, at most one chunk
    per `BLOCK_COLUMNS` columns and at most `MAX_SPLITS`. Fixed for a (rows, width) bucket, so that a CUDA graph
    replays the same launch."""
    return max(1, min(ceil_div(width, BLOCK_COLUMNS), ceil_div(PROGRAMS_PER_SM * sms, pairs), MAX_SPLITS))


@functools.cache
def sm_count(device: torch.device) -> int:
    """The device's SMs (8 off CUDA, where the interpreter runs the kernels one program after another)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def split_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale * query @ keys^T, over the columns `mask` shows) @ values, per (row, key head).

    `query` is [rows, kv_heads, groups, head_dim] (a decode token's query heads folded per key head), `keys` and
    `values` [rows, kv_heads, width, head_dim], `mask` [rows, width] (True where a row sees the column; every row
    sees at least one). Any strides with the head dimension contiguous. Returns [rows, kv_heads, groups, head_dim]
    in the query's dtype."""
    rows, kv_heads, groups, head_dim = query.shape
    width = keys.shape[2]
    for name, tensor in (("query", query), ("keys", keys), ("values", values)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"split_attention: the {name}' head dimension must be contiguous")
    kernels = compiled_kernels()
    pairs = rows * kv_heads
    splits = split_count(pairs, width, sm_count(query.device))
    chunk = ceil_div(ceil_div(width, splits), BLOCK_COLUMNS) * BLOCK_COLUMNS  # columns per chunk, whole blocks
    splits = ceil_div(width, chunk)  # rounding the chunks up may leave fewer of them
    group_block = max(16, 1 << (groups - 1).bit_length())  # tl.dot needs 16 rows or more
    partial = torch.empty((pairs, splits, group_block, head_dim), dtype=torch.float32, device=query.device)
    maxima = torch.empty((pairs, splits, group_block), dtype=torch.float32, device=query.device)
    sums = torch.empty_like(maxima)
    visible = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    kernels.partial[(pairs, splits)](
        query, keys, values, visible, partial, maxima, sums,
        *query.stride()[:3], *keys.stride()[:3], *values.stride()[:3], visible.stride(0),
        kv_heads, groups, width, chunk, scale,
        GROUPS=group_block, HEAD_DIM=head_dim, BLOCK=BLOCK_COLUMNS, IEEE=query.dtype == torch.float32,
        **launch_options(query.device),
    )  # fmt: skip
    out = torch.empty((rows, kv_heads, groups, head_dim), dtype=query.dtype, device=query.device)
    kernels.combine[(pairs, groups)](
        partial, maxima, sums, out, splits, groups,
        GROUPS=group_block, HEAD_DIM=head_dim, SPLITS=max(2, 1 << (splits - 1).bit_length()),
        **launch_options(query.device),
    )  # fmt: skip
    return out


class Kernels:
    def __init__(self, partial: Any, combine: Any) -> None:
        self.partial, self.combine = partial, combine


@functools.cache
def compiled_kernels() -> Kernels:
    """The two kernels, defined on first use: Triton decides at definition whether they are interpreted."""
    return Kernels(partial_attention_kernel(), combine_kernel())


def partial_attention_kernel() -> Any:
    """Each (row, key head, chunk of columns): the running softmax of its query heads over the chunk."""
    import triton
    import triton.language as tl

    @triton.jit
    def partial_attention(
        q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, max_ptr, sum_ptr,
        q_row, q_head, q_group, k_row, k_head, k_col, v_row, v_head, v_col, mask_row,
        kv_heads, groups, width, chunk, scale,
        GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # the query and this token's key come from the kernel before
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pair, split = tl.program_id(0), tl.program_id(1)
        row, head = pair // kv_heads, pair % kv_heads
        g = tl.arange(0, GROUPS)
        d = tl.arange(0, HEAD_DIM)
        query = tl.load(q_ptr + row * q_row + head * q_head + g[:, None] * q_group + d[None, :],
                        mask=g[:, None] < groups, other=0.0)  # fmt: skip
        running_max = tl.full((GROUPS,), -1.0e30, tl.float32)
        running_sum = tl.zeros((GROUPS,), tl.float32)
        acc = tl.zeros((GROUPS, HEAD_DIM), tl.float32)
        start = split * chunk
        end = tl.minimum(start + chunk, width)
        for first in range(start, end, BLOCK):
            col = first + tl.arange(0, BLOCK)
            inside = col < end
            seen = tl.load(mask_ptr + row * mask_row + col, mask=inside, other=0) != 0
            key = tl.load(k_ptr + row * k_row + head * k_head + col[:, None] * k_col + d[None, :],
                          mask=inside[:, None], other=0.0)  # fmt: skip
            if IEEE:  # float32 tensors: full-precision products, not TF32's
                scores = tl.dot(query, tl.trans(key), input_precision="ieee") * scale
            else:
                scores = tl.dot(query, tl.trans(key)) * scale
            scores = tl.where(seen[None, :], scores, -1.0e30)
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            weights = tl.where(seen[None, :], tl.exp(scores - new_max[:, None]), 0.0)
            rescale = tl.exp(running_max - new_max)
            running_sum = running_sum * rescale + tl.sum(weights, 1)
            value = tl.load(v_ptr + row * v_row + head * v_head + col[:, None] * v_col + d[None, :],
                            mask=inside[:, None], other=0.0)  # fmt: skip
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights, value, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(value.dtype), value)
            running_max = new_max
        slot = pair * tl.num_programs(1) + split
        tl.store(acc_ptr + (slot * GROUPS + g[:, None]) * HEAD_DIM + d[None, :], acc)
        tl.store(max_ptr + slot * GROUPS + g, running_max)
        tl.store(sum_ptr + slot * GROUPS + g, running_sum)

    return partial_attention


def combine_kernel() -> Any:
    """Each (row, key head) pair's chunks merged into its query heads' outputs."""
    import triton
    import triton.language as tl

    @triton.jit
    def attention_combine(
        acc_ptr, max_ptr, sum_ptr, out_ptr, splits, groups,
        GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pair, group = tl.program_id(0), tl.program_id(1)  # one query head per program: all its chunks at once
        c = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        slot = (pair * splits + c) * GROUPS + group
        present = c < splits
        part_max = tl.load(max_ptr + slot, mask=present, other=-1.0e30)
        part_sum = tl.load(sum_ptr + slot, mask=present, other=0.0)
        part = tl.load(acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], mask=present[:, None], other=0.0)
        weight = tl.exp(part_max - tl.max(part_max, 0))
        total = tl.sum(part_sum * weight, 0)
        out = tl.sum(part * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + (pair * groups + group) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    return attention_combine
