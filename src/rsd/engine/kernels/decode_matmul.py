"""A decode token's matrix products with the small operations around them, one Triton kernel each.

A decode forward of a 1.5B model at up to 16 rows (or a verification of up to 16 tokens) reads each projection's
weights once, a few megabytes each, and between the products it runs the residual adds, the norms and the SiLU
gate: eleven kernels a layer, each with its launch and tail. Here a layer's four products carry that work
themselves (`decode_linear`):

- the query/key/value and gate/up products normalise their input as they read it (`norm`: the RMSNorm of the
  residual stream, its row's scale computed by each program from the whole row, which is a few kilobytes);
- the down product reads the gate/up product's output and applies the SiLU gate to it as it reads it (`gated`);
- the output and down products add their result into the residual stream (`residual`, in place).

A layer is then seven kernels (the four products, the rotation with the arena writes, the attention and its
merge). Each rounds where transformers' modules round (the norm's output cast before its weight, silu(gate) before
its product, a product before its add), as `layer_kernels` does.

The products are tiled for few rows: each program holds a block of the weight's output features against every row
(the rows are the small side of the tensor cores' product), and where a product has too few output blocks to fill
the card its inner dimension is split over several programs (`SPLIT_K`); the last of them to finish (an atomic
count) adds the partial sums in a fixed order and applies the epilogue, so a result never depends on which
program finished first. `launch_plan` picks the blocks from the product's shape and the card's SMs, so that a CUDA
graph replays the same launch for a (rows, shape) bucket.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from rsd.engine.kernels.split_attention import ceil_div, launch_options, sm_count

MAX_ROWS = 16  # the most rows a product runs here: at 64, cuBLAS's tiles beat these (a 1.5B layer: 85.5 us to 60.3)
MAX_HIDDEN = 2048  # the largest model (hidden size) whose layers run these products (see `decode_products_problem`)
MIN_BLOCK_ROWS = 16  # tl.dot's smallest side
BLOCK_INNER = 128  # inner columns per iteration
# A product is split over its inner dimension until its programs number at least this share of the SMs and each
# reads at most MAX_SPLIT_RUN inner columns, in whole blocks, at most MAX_SPLITS ways.
MIN_PROGRAMS_PER_SM = 0.45
MAX_SPLIT_RUN = 1536
MAX_SPLITS = 8
COUNTERS = 4096  # output blocks a split product may have (one arrival counter each)


class LaunchPlan(NamedTuple):
    block_rows: int
    block_features: int  # output features per program
    block_inner: int  # inner columns per iteration
    splits: int  # programs per output block, each a run of whole inner blocks
    warps: int
    stages: int


def decode_products_problem(hidden_size: int) -> str | None:
    """Why a model's decode forwards do not run their products here, or None.

    Measured on an H100 at 16 rows (one product at a time, its weights out of L2, `benchmarks/decode_products.py`'s
    method): a 1.5B model's layer (hidden 1536) takes 53.8 us here against 57.8 us through cuBLAS with the norm and
    SiLU kernels; a 14B model's (hidden 5120) 223.4 us at its best plans against 220.5 us. Past a few tens of
    megabytes a product streams its weights as fast through cuBLAS, and the kernels saved matter less."""
    if hidden_size > MAX_HIDDEN:
        return f"its hidden size {hidden_size} is over {MAX_HIDDEN}: cuBLAS runs its larger products as fast"
    return None


def launch_plan(rows: int, features: int, inner: int, sms: int, normed: bool) -> LaunchPlan:
    """Blocks for a product of `rows` rows, `features` outputs and `inner` inner columns on a card of `sms` SMs,
    `normed` where each program first reads its rows whole (the norm): wider blocks, fewer of those reads."""
    block_rows = max(MIN_BLOCK_ROWS, 1 << (rows - 1).bit_length())
    block_features, warps, stages = (128, 8, 3) if normed else (64, 4, 4)
    blocks = ceil_div(features, block_features)
    splits = 1
    while (
        splits < MAX_SPLITS
        and (blocks * splits < MIN_PROGRAMS_PER_SM * sms or inner / splits > MAX_SPLIT_RUN)
        and inner // (2 * splits) >= BLOCK_INNER
        and blocks <= COUNTERS
    ):
        splits *= 2
    return LaunchPlan(block_rows, block_features, BLOCK_INNER, splits, warps, stages)


def decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for up to `MAX_ROWS` rows, with the operations around it:

    - `norm` (weight, eps): the product reads RMSNorm(x) (x's rows are the residual stream);
    - `gated`: x is a gate/up product's output, [rows, 2 x inner]; the product reads silu(gate) x up;
    - `residual` ([rows, features]): the result is added into it in place, and it is returned.

    `counters` (int32 zeros, at least `COUNTERS`, left zero by every launch) is needed where the plan splits the
    inner dimension."""
    rows = x.shape[0]
    features, inner = weight.shape
    if (x.shape[1] // 2 if gated else x.shape[1]) != inner:
        raise ValueError(f"x has {x.shape[1]} columns; the weight reads {inner}{' (x2, gated)' if gated else ''}")
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} rows: the decode products run up to {MAX_ROWS}")
    if any(t is not None and t.stride(-1) != 1 for t in (x, weight, residual)):
        raise ValueError("x, the weight and the residual stream must each be row-major (a contiguous last dimension)")
    plan = launch_plan(rows, features, inner, sm_count(x.device), normed=norm is not None)
    if plan.splits > 1 and counters is None:
        raise ValueError("a split product needs `counters`")
    out = residual if residual is not None else torch.empty((rows, features), dtype=x.dtype, device=x.device)
    blocks = ceil_div(features, plan.block_features)
    partial_floats = blocks * plan.splits * plan.block_features * plan.block_rows if plan.splits > 1 else 1
    partials = x.new_empty((partial_floats,), dtype=torch.float32)  # unread by an unsplit product
    norm_weight, eps = norm if norm is not None else (weight, 0.0)
    compiled_kernel()[(blocks, plan.splits)](
        x, weight, bias if bias is not None else weight, norm_weight, out, partials,
        counters if counters is not None else partials,
        rows, features, inner, x.stride(0), weight.stride(0), out.stride(0), eps,
        NORM=norm is not None, GATED=gated, BIAS=bias is not None, RESIDUAL=residual is not None,
        IEEE=x.dtype == torch.float32, BLOCK_M=plan.block_rows, BLOCK_N=plan.block_features,
        BLOCK_K=plan.block_inner, SPLIT_K=plan.splits, num_warps=plan.warps, num_stages=plan.stages,
        **launch_options(x.device),
    )  # fmt: skip
    return out


def new_counters(device: torch.device) -> torch.Tensor:
    """The arrival counters of a model's split products: zeros, which every launch leaves zero."""
    return torch.zeros(COUNTERS, dtype=torch.int32, device=device)


@functools.cache
def compiled_kernel() -> Any:
    """The kernel, defined on first use: Triton decides at definition whether it is interpreted."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_product(
        x_ptr, w_ptr, bias_ptr, norm_ptr, out_ptr, partial_ptr, count_ptr,
        rows, features, inner, x_row, w_row, out_row, eps,
        NORM: tl.constexpr, GATED: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # a programmatic dependent: its inputs come from the kernel before
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        block, split = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        row_in, feature_in = m < rows, n < features
        x_rows = x_ptr + m[:, None] * x_row
        if NORM:  # each row's RMS over all its columns, before this program reads its share of them
            squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, inner, BLOCK_K):
                k = start + kk
                v = tl.load(x_rows + k[None, :], mask=row_in[:, None] & (k < inner)[None, :], other=0.0)
                v = v.to(tl.float32)
                squares += tl.sum(v * v, 1)
            scale = 1.0 / tl.sqrt(squares / inner + eps)
        per_split = tl.cdiv(tl.cdiv(inner, BLOCK_K), SPLIT_K) * BLOCK_K
        first = split * per_split
        last = tl.minimum(first + per_split, inner)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # output features x rows: rows are the small side
        for start in range(first, last, BLOCK_K):
            k = start + kk
            k_in = k < last
            w = tl.load(w_ptr + n[:, None] * w_row + k[None, :], mask=feature_in[:, None] & k_in[None, :], other=0.0)
            both = row_in[:, None] & k_in[None, :]
            if GATED:  # silu(gate) x up, rounded as the SiLU kernel rounds
                gate = tl.load(x_rows + k[None, :], mask=both, other=0.0)
                up = tl.load(x_rows + inner + k[None, :], mask=both, other=0.0)
                g = gate.to(tl.float32)
                activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
                v = (activated * up.to(tl.float32)).to(gate.dtype)
            else:
                v = tl.load(x_rows + k[None, :], mask=both, other=0.0)
                if NORM:  # transformers casts the normalised row before its weight
                    normed = (v.to(tl.float32) * scale[:, None]).to(v.dtype).to(tl.float32)
                    g = tl.load(norm_ptr + k, mask=k_in, other=0.0).to(tl.float32)
                    v = (g[None, :] * normed).to(v.dtype)
            if IEEE:  # float32 tensors: full-precision products, not TF32's
                acc += tl.dot(w, tl.trans(v), input_precision="ieee")
            else:
                acc += tl.dot(w, tl.trans(v))
        nn = tl.arange(0, BLOCK_N)
        if SPLIT_K > 1:  # the last program of this output block to arrive adds every partial, in split order
            own = partial_ptr + ((block * SPLIT_K + split) * BLOCK_N + nn[:, None]) * BLOCK_M + m[None, :]
            tl.store(own, acc)
            tl.debug_barrier()  # every thread's partial is written before the count says so
            arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel")
            is_last = (tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32) + arrived) == SPLIT_K - 1
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in range(SPLIT_K):
                part = partial_ptr + ((block * SPLIT_K + s) * BLOCK_N + nn[:, None]) * BLOCK_M + m[None, :]
                acc += tl.load(part, mask=is_last, other=0.0, cache_modifier=".cg")
            tl.store(count_ptr + block, 0, mask=arrived == SPLIT_K - 1)  # zero again for the next launch
            keep = is_last
        else:
            keep = tl.full([BLOCK_N, BLOCK_M], 1, dtype=tl.int1)
        if BIAS:
            acc += tl.load(bias_ptr + n, mask=feature_in, other=0.0).to(tl.float32)[:, None]
        target = out_ptr + m[None, :] * out_row + n[:, None]
        inside = keep & feature_in[:, None] & row_in[None, :]
        result = acc.to(out_ptr.dtype.element_ty)  # the product, rounded before any add
        if RESIDUAL:  # the residual stream plus the product, rounded as add_rms_norm rounds
            stream = tl.load(target, mask=inside, other=0.0)
            result = (stream.to(tl.float32) + result.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(target, result, mask=inside)

    return decode_product
