"""Each layer's projections as one matrix product per group: q/k/v together, and the MLP's gate and up together.

At 16 rows a projection of a 1.5B model reads a few megabytes: its kernel's launch and tail, not its bytes, set its
time, and the keys' and values' products (256 columns each) are the smallest of all. One product per group reads
the same bytes in one kernel. The model's own projections are re-pointed at slices of the concatenated weights, so
nothing is held twice and transformers' forward of the same model reads the very same memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch


class FusedProjections(NamedTuple):
    qkv: torch.Tensor  # [q; k; v] weights, [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up: torch.Tensor  # [gate; up] weights, [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None


FUSABLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")  # down_proj(act_fn(gate_proj(x)) * up_proj(x))


def fuse_projections(layers: Sequence[Any]) -> list[FusedProjections] | None:
    """Each layer's q/k/v and gate/up weights concatenated into one matrix each, or None where any layer's are not
    plain `nn.Linear` weights on one device (a quantized or adapted layer, offloaded weights, a hook).

    The model's own projections are re-pointed at slices of the concatenated matrices, so the weights are not held
    twice, and its eager forward (the prefill) reads the very same memory. A second decoder of the same model finds
    the fusion done and reuses it."""
    if not all(fusable_layer(layer) for layer in layers):
        return None
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, so the model still works under autograd
        return [
            FusedProjections(
                *concatenated(layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                *concatenated(layer.mlp, ("gate_proj", "up_proj"))[:2],
            )
            for layer in layers
        ]


def fusable_layer(layer: Any) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(mlp).__name__ not in FUSABLE_MLPS or attn is None:
        return False
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    projections += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj")]
    if not all(type(module) is torch.nn.Linear and plain_module(module) for module in projections):
        return False
    weights = [module.weight for module in projections]
    if any(w.device.type == "meta" or (w.device, w.dtype) != (weights[0].device, weights[0].dtype) for w in weights):
        return False
    # Either every projection of a group has a bias or none has (Qwen2: q, k, v do; the MLP's do not).
    return all(len({m.bias is None for m in group}) == 1 for group in (projections[:3], projections[3:]))


def plain_module(module: Any) -> bool:
    """No hooks (accelerate's offloading, adapters, user hooks) that a direct matrix product would bypass."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def concatenated(parent: Any, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """The weights (and biases) of `parent`'s projections `names` as one matrix, the projections re-pointed at its
    rows; the matrix the projections already share when an earlier call made it."""
    modules = [getattr(parent, name) for name in names]
    sizes = tuple(int(module.weight.shape[0]) for module in modules)
    weight = shared_matrix([module.weight for module in modules])
    if weight is None:
        weight = torch.cat([module.weight for module in modules])
        repoint(modules, "weight", weight.split(sizes))
    bias = None
    if modules[0].bias is not None:
        bias = shared_matrix([module.bias for module in modules])
        if bias is None:
            bias = torch.cat([module.bias for module in modules])
            repoint(modules, "bias", bias.split(sizes))
    return weight, bias, sizes


def shared_matrix(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The one matrix `parts` are consecutive rows of (an earlier fusion), or None."""
    first = parts[0]
    storage = first.untyped_storage()
    offset = first.storage_offset()
    for part in parts:
        if part.untyped_storage().data_ptr() != storage.data_ptr() or part.storage_offset() != offset:
            return None
        if not part.is_contiguous():
            return None
        offset += part.numel()
    rows = sum(int(part.shape[0]) for part in parts)
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, *first.shape[1:]))


def repoint(modules: Sequence[Any], name: str, slices: Sequence[torch.Tensor]) -> None:
    for module, part in zip(modules, slices, strict=True):
        old = getattr(module, name)
        setattr(module, name, torch.nn.Parameter(part, requires_grad=old.requires_grad))
