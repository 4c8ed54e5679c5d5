"""A decoder layer's small operations in three Triton kernels, for the engine's forward (`rsd.engine.forward`).

After the projections, a decode token's layer is a string of kernels that each move a few kilobytes: the rotation
of the query and key heads (three), the arena writes of the key and value (two), the residual adds (two), the norms
(two), the MLP's activation and product (two). At an H200's 2-3 microseconds per launch, they cost a 1.5B draft's
token about 0.6 ms over 28 layers (`benchmarks/decode_kernels.py`). Here they are three kernels: rotate the query
and key heads and write the key and value into the arena (`rotate_into_arena`), add a residual and normalise
(`add_rms_norm`), and the SiLU gate times the up projection (`silu_times_up`).

Each rounds where transformers' modules round (a bf16 product before the next add, the norm's output cast before
its weight), so that a bf16 decode computes what the modules compute, up to the last bit of `exp` and `rsqrt`.

`layer_kernels_problem` says why a model's layers cannot run here; off CUDA, `TRITON_INTERPRET=1` runs the kernels
through Triton's interpreter (the tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from rsd.engine.kernels.split_attention import launch_options, split_attention_problem

ELEMENTWISE_BLOCK = 1024  # elements per program of the SiLU kernel


def layer_kernels_problem(model_body: Any, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the Triton layer kernels cannot run a body's decode forward, or None."""
    problem = split_attention_problem(device, dtype, head_dim)  # the same Triton, device and head-size needs
    if problem:
        return problem
    for layer in model_body.layers:
        if hasattr(layer.self_attn, "q_norm"):
            return "its attention normalises each head (Qwen3): the rotation kernel does not"
        if type(layer.mlp.act_fn).__name__ != "SiLUActivation" and not isinstance(layer.mlp.act_fn, torch.nn.SiLU):
            return f"its MLP's activation is {type(layer.mlp.act_fn).__name__}, not SiLU"
    norms = [norm for layer in model_body.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    for norm in [*norms, model_body.norm]:
        if getattr(norm, "weight", None) is None or getattr(norm, "variance_epsilon", None) is None:
            return f"its norm {type(norm).__name__} is not an RMSNorm with a weight and variance_epsilon"
    return None


def rotate_into_arena(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    heads: int,
    kv_heads: int,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """From one projection's output `qkv` ([tokens, (heads + 2 kv_heads) x head_dim], query heads, key heads, value
    heads): the rotated query, [tokens, heads, head_dim]; the rotated key and the value are written into `keys` and
    `values` ([rows, kv_heads, width, head_dim]) at arena row `slots[i]` and column `columns[i]` for token i (device
    tensors, so a CUDA graph replays the same launch at the next columns). Without `slots`, token i is arena row i
    (a decode forward: one token a row). `cos` and `sin_signed` are [tokens, head_dim] (`forward.signed_sin`)."""
    tokens, head_dim = qkv.shape[0], cos.shape[-1]
    query = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    packed = slots is not None
    compiled_kernels().rotate[(tokens, heads + 2 * kv_heads)](
        qkv, cos, sin_signed, query, keys, values, columns, slots if packed else columns,
        qkv.stride(0), cos.stride(0), sin_signed.stride(0), *keys.stride()[:3], *values.stride()[:3],
        heads, kv_heads, HEAD_DIM=head_dim, PACKED=packed,
        num_warps=1 if packed else 4,  # a head is head_dim elements: one warp, for the many programs of a prefill
        **launch_options(qkv.device),
    )  # fmt: skip
    return query


def add_rms_norm(
    hidden: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + update, RMSNorm of it): the residual stream after a sublayer and the next sublayer's input, both
    [rows, size]. `hidden` is updated in place."""
    return hidden, normed_rows(hidden, update, weight, eps)


def rms_norm_rows(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm of each row of `hidden` ([rows, size]), rounded as `add_rms_norm` rounds; `hidden` unchanged."""
    return normed_rows(hidden, None, weight, eps)


def normed_rows(hidden: torch.Tensor, update: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The norm kernel over each row: `update` added into `hidden` first where one is given."""
    rows, size = hidden.shape
    normed = torch.empty_like(hidden)
    block = 1 << (size - 1).bit_length()
    added = update if update is not None else hidden  # not read without an update
    compiled_kernels().add_norm[(rows,)](
        hidden, added, weight, normed, hidden.stride(0), added.stride(0), size, eps, BLOCK=block,
        ADD=update is not None, num_warps=8 if block >= 4096 else 4, **launch_options(hidden.device),
    )  # fmt: skip
    return normed


def silu_times_up(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) x up from the MLP's fused product ([rows, 2 x intermediate]: gate, then up)."""
    rows, both = gate_up.shape
    size = both // 2
    out = torch.empty((rows, size), dtype=gate_up.dtype, device=gate_up.device)
    grid = (rows, -(-size // ELEMENTWISE_BLOCK))
    compiled_kernels().silu[grid](
        gate_up, out, gate_up.stride(0), size, BLOCK=ELEMENTWISE_BLOCK, **launch_options(gate_up.device)
    )
    return out


class Kernels:
    def __init__(self, rotate: Any, add_norm: Any, silu: Any) -> None:
        self.rotate, self.add_norm, self.silu = rotate, add_norm, silu


@functools.cache
def compiled_kernels() -> Kernels:
    """The kernels, defined on first use: Triton decides at definition whether they are interpreted."""
    return Kernels(rotate_write_kernel(), *elementwise_kernels())


def rotate_write_kernel() -> Any:
    """Rotate a token's query and key heads; write its key and value heads into the arena."""
    import triton
    import triton.language as tl

    @triton.jit
    def rotate_write(
        qkv_ptr, cos_ptr, sin_ptr, query_ptr, keys_ptr, values_ptr, column_ptr, slot_ptr,
        qkv_row, cos_row, sin_row, k_row, k_head, k_col, v_row, v_head, v_col,
        heads, kv_heads, HEAD_DIM: tl.constexpr, PACKED: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # a programmatic dependent (`split_attention.dependent_launches`): wait for the kernel before
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row, head = tl.program_id(0), tl.program_id(1)  # head: query heads, then key heads, then value heads
        d = tl.arange(0, HEAD_DIM)
        source = qkv_ptr + row * qkv_row + head * HEAD_DIM
        x = tl.load(source + d)
        column = tl.load(column_ptr + row)  # each token its own column
        if PACKED:  # noqa: SIM108 (Triton compiles a constexpr branch, not a conditional expression)
            # several tokens a row: each names its arena row
            slot = tl.load(slot_ptr + row)
        else:  # a decode token: token i is arena row i
            slot = row
        if head < heads + kv_heads:
            # x * cos + rotate_half(x) * sin == x * cos + roll(x, half) * signed sin, rounded as
            # torch.addcmul(x * cos, roll(x), signed sin) rounds (forward.rotate).
            rolled = tl.load(source + (d + HEAD_DIM // 2) % HEAD_DIM).to(tl.float32)
            cos = tl.load(cos_ptr + row * cos_row + d).to(tl.float32)
            sin = tl.load(sin_ptr + row * sin_row + d).to(tl.float32)
            scaled = (x.to(tl.float32) * cos).to(x.dtype).to(tl.float32)
            rotated = (scaled + rolled * sin).to(x.dtype)
            if head < heads:
                tl.store(query_ptr + (row * heads + head) * HEAD_DIM + d, rotated)
            else:
                kv = head - heads
                tl.store(keys_ptr + slot * k_row + kv * k_head + column * k_col + d, rotated)
        else:
            kv = head - heads - kv_heads
            tl.store(values_ptr + slot * v_row + kv * v_head + column * v_col + d, x)

    return rotate_write


def elementwise_kernels() -> tuple[Any, Any]:
    """The residual add with the next norm, and the SiLU gate times the up projection."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_rms_norm_rows(
        hidden_ptr, update_ptr, weight_ptr, normed_ptr, hidden_row, update_row, size, eps,
        BLOCK: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        inside = i < size
        hidden = tl.load(hidden_ptr + row * hidden_row + i, mask=inside, other=0.0)
        if ADD:
            update = tl.load(update_ptr + row * update_row + i, mask=inside, other=0.0)
            summed = (hidden.to(tl.float32) + update.to(tl.float32)).to(hidden.dtype)  # the residual, rounded
            tl.store(hidden_ptr + row * hidden_row + i, summed, mask=inside)
        else:
            summed = hidden
        x = summed.to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(x * x, 0) / size + eps)
        weight = tl.load(weight_ptr + i, mask=inside, other=0.0)
        normed = (x * scale).to(hidden.dtype)  # transformers casts before the weight
        out = (weight.to(tl.float32) * normed.to(tl.float32)).to(hidden.dtype)
        tl.store(normed_ptr + row * size + i, out, mask=inside)

    @triton.jit
    def silu_gate(gate_up_ptr, out_ptr, gate_up_row, size, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row, block = tl.program_id(0), tl.program_id(1)
        i = block * BLOCK + tl.arange(0, BLOCK)
        inside = i < size
        gate = tl.load(gate_up_ptr + row * gate_up_row + i, mask=inside, other=0.0)
        up = tl.load(gate_up_ptr + row * gate_up_row + size + i, mask=inside, other=0.0)
        g = gate.to(tl.float32)
        activated = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch rounds silu(gate) before the product
        out = (activated.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
        tl.store(out_ptr + row * size + i, out, mask=inside)

    return add_rms_norm_rows, silu_gate
