"""A decode layer's four products, each with the small operation it carries, against the kernels they replace.

Per model shape and row count, each product of a layer (`rsd.engine.kernels.decode_matmul`): q/k/v and gate/up
with the RMSNorm before them, the output projection with the residual add after it, down with the SiLU gate before
it and the add after it; and the LM head with the final norm. Each is timed two ways on the same inputs:

- `kernels`: what a layer runs without them, cuBLAS's product (`F.linear`) with rsd's norm or SiLU kernel
  (`layer_kernels`) before it (a residual add is charged to the norm kernel that does it);
- `products`: `decode_linear` at the launch plan the engine picks (`launch_plan`), and with `--sweep` at every plan
  of a grid (blocks of output features and inner columns, splits of the inner dimension, warps, stages).

Each figure is the median of 7 CUDA-graph replays of the product over enough copies of its weights (distinct
tensors) to read 300 MB, so that no copy comes from L2, divided by the copies; next to it the product's byte
floor (its weights over 3.0 TB/s). Per model and rows, the sum over a layer's four products.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python benchmarks/decode_products.py --rows 16 --sweep --out $OUT
    PYTHONPATH=src python benchmarks/decode_products.py --tiny   # the CPU smoke test (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MODELS = {  # hidden size, intermediate size, attention heads, key/value heads, vocabulary (gpu_speed's shapes)
    "draft": (1536, 8960, 12, 2, 151936),
    "7b": (3584, 18944, 28, 4, 152064),
    "14b": (5120, 13824, 40, 8, 152064),
    "tiny": (64, 160, 4, 2, 256),
}
PRODUCTS = ("qkv", "o", "gate_up", "down", "head")
EPS = 1e-6
BYTES_PER_SECOND = 3.0e12  # an H100's HBM3, about: the floor's rate
COPY_BYTES = 300e6  # weights read per replay, so that none of them is in L2 (50 MB on an H100)


def shapes(model: str) -> dict[str, tuple[int, int]]:
    """(output features, inner columns) of each product of the model."""
    hidden, inner, heads, kv_heads, vocab = MODELS[model]
    head_dim = hidden // heads
    return {
        "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o": (hidden, hidden),
        "gate_up": (2 * inner, hidden),
        "down": (hidden, inner),
        "head": (vocab, hidden),
    }


def sweep_plans(products: Any, rows: int, features: int, inner: int, sms: int) -> list[Any]:
    """Every plan of the grid that fits: splits only where whole inner blocks remain, at most 6 programs per SM."""
    block_rows = products.launch_plan(rows, features, inner, sms, normed=False).block_rows
    plans = []
    for features_block, inner_block, splits, stages in itertools.product((16, 32, 64, 128), (64, 128, 256, 512),
                                                                         (1, 2, 4, 8), (3, 4)):  # fmt: skip
        if (block_rows == 64 and inner_block == 512) or (block_rows < 64 and inner_block == 64):
            continue
        if features_block * inner_block * 2 * stages > 160 * 1024:  # shared memory
            continue
        blocks = math.ceil(features / features_block)
        if splits > 1 and (inner // splits < inner_block or blocks * splits > 6 * sms):
            continue
        warps = 8 if features_block == 128 else 4
        plans.append(products.LaunchPlan(block_rows, features_block, inner_block, splits, warps, stages))
    return plans


class Inputs:
    """A product's inputs: `copies` weight matrices, its input rows, the residual stream, the norm weight."""

    def __init__(self, product: str, rows: int, features: int, inner: int, copies: int, device: str, dtype) -> None:
        generator = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, device=device, generator=generator).to(dtype)

        self.weights = [randn(features, inner) / inner**0.5 for _ in range(copies)]
        self.x = randn(rows, 2 * inner if product == "down" else inner)  # down reads the gate/up product's output
        self.bias = randn(features) if product == "qkv" else None
        self.norm = randn(inner).abs() + 0.5
        self.stream = randn(rows, features)  # the residual stream the output and down products add into
        self.zeros = torch.zeros_like(self.x)


def kernels_call(product: str, inputs: Inputs, weight: torch.Tensor, layer_kernels: Any) -> torch.Tensor:
    """The product as a layer runs it without `decode_linear`."""
    if product in ("qkv", "gate_up", "head"):
        _, normed = layer_kernels.add_rms_norm(inputs.x, inputs.zeros, inputs.norm, EPS)  # the add of the last sublayer
        return F.linear(normed, weight, inputs.bias)
    if product == "down":
        return F.linear(layer_kernels.silu_times_up(inputs.x), weight)
    return F.linear(inputs.x, weight)


def products_call(product: str, inputs: Inputs, weight: torch.Tensor, stream: torch.Tensor, products: Any,
                  counters: torch.Tensor) -> torch.Tensor:  # fmt: skip
    if product in ("qkv", "gate_up", "head"):
        return products.decode_linear(inputs.x, weight, inputs.bias, norm=(inputs.norm, EPS), counters=counters)
    gated = product == "down"
    return products.decode_linear(inputs.x, weight, gated=gated, residual=stream, counters=counters)


def reference(product: str, inputs: Inputs) -> torch.Tensor:
    """What `products_call` computes, in float32 through torch."""
    x, weight = inputs.x.float(), inputs.weights[0].float()
    if product in ("qkv", "gate_up", "head"):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * inputs.norm.float()
        bias = None if inputs.bias is None else inputs.bias.float()
        return F.linear(normed, weight, bias)
    if product == "down":
        half = x.shape[1] // 2
        return inputs.stream.float() + F.linear(F.silu(x[:, :half]) * x[:, half:], weight)
    return inputs.stream.float() + F.linear(x, weight)


def replay_ms(work: Callable[[], Any], device: str, replays: int = 7) -> float:
    """Milliseconds of `work`: the median of CUDA-graph replays on a GPU, of plain calls on the CPU."""
    if not device.startswith("cuda"):
        times = []
        for _ in range(replays):
            start = time.perf_counter()
            work()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled and warmed outside the capture
        work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(model: str, rows: int, product: str, config: argparse.Namespace, modules: tuple) -> dict:
    products, layer_kernels = modules
    features, inner = shapes(model)[product]
    dtype = torch.float32 if config.tiny else torch.bfloat16
    copies = 2 if config.tiny else max(2, math.ceil(COPY_BYTES / (features * inner * 2)))
    inputs = Inputs(product, rows, features, inner, copies, config.device, dtype)
    sms = products.sm_count(torch.device(config.device))
    counters = products.new_counters(torch.device(config.device))
    chosen = products.launch_plan(rows, features, inner, sms, normed=product in ("qkv", "gate_up", "head"))
    plans = [chosen]
    if config.sweep:
        plans += [plan for plan in sweep_plans(products, rows, features, inner, sms) if plan != chosen]

    def per_copy(work: Callable[[torch.Tensor], Any]) -> float:
        return replay_ms(lambda: [work(w) for w in inputs.weights], config.device) / copies

    kernels_ms = per_copy(lambda w: kernels_call(product, inputs, w, layer_kernels))
    timed = []
    real_plan = products.launch_plan
    try:
        for plan in plans:
            products.launch_plan = lambda *shape, normed, plan=plan: plan
            try:
                got = products_call(product, inputs, inputs.weights[0], inputs.stream.clone(), products, counters)
                want = reference(product, inputs)
                error = float((got.float() - want).abs().max() / want.abs().max())
                stream = inputs.stream.clone()  # the timed replays add into a copy of the stream
                ms = per_copy(lambda w, stream=stream: products_call(product, inputs, w, stream, products, counters))
            except Exception as exc:  # a plan that does not fit this card (shared memory): named, then skipped
                print(f"  {model} rows {rows} {product} {tuple(plan)}: {type(exc).__name__}", file=sys.stderr)
                continue
            timed.append({"plan": list(plan), "ms": ms, "error": error, "chosen": plan == chosen})
    finally:
        products.launch_plan = real_plan
    timed.sort(key=lambda t: t["ms"])
    return {
        "model": model,
        "rows": rows,
        "product": product,
        "features": features,
        "inner": inner,
        "floor_ms": 1e3 * features * inner * 2 / BYTES_PER_SECOND,
        "kernels_ms": kernels_ms,
        "products_ms": next(t["ms"] for t in timed if t["chosen"]),
        "best": timed[0],
        "plans": timed,
    }


def report_lines(results: list[dict]) -> list[str]:
    lines = ["model | rows | product | features x inner | floor us | kernels us | products us | best us (plan) | error"]
    for r in results:
        best = r["best"]
        lines.append(
            f"{r['model']} | {r['rows']} | {r['product']} | {r['features']} x {r['inner']} | "
            f"{1e3 * r['floor_ms']:.1f} | {1e3 * r['kernels_ms']:.1f} | {1e3 * r['products_ms']:.1f} | "
            f"{1e3 * best['ms']:.1f} {tuple(best['plan'])} | {max(t['error'] for t in r['plans']):.1e}"
        )
    for (model, rows), group in itertools.groupby(results, key=lambda r: (r["model"], r["rows"])):
        layer = [r for r in group if r["product"] != "head"]
        sums = [1e3 * sum(r[key] for r in layer) for key in ("floor_ms", "kernels_ms", "products_ms")]
        best = 1e3 * sum(r["best"]["ms"] for r in layer)
        lines.append(
            f"-- {model}, {rows} rows, a layer's four products: floor {sums[0]:.1f} us, kernels {sums[1]:.1f} us, "
            f"products {sums[2]:.1f} us (best plans {best:.1f} us)"
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=[m for m in MODELS if m != "tiny"], default=["draft", "14b"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--products", nargs="+", choices=PRODUCTS, default=list(PRODUCTS))
    parser.add_argument("--sweep", action="store_true", help="time every plan of the grid too, not only the chosen")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    parser.add_argument("--out", type=Path, help="folder for decode_products.json")
    config = parser.parse_args(argv)
    config.device = "cpu" if config.tiny else "cuda"
    if config.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported, by the kernels below
        config.models, config.rows = ["tiny"], [min(config.rows)]
    from rsd.engine.kernels import decode_matmul as products
    from rsd.engine.kernels import layer_kernels

    started = time.perf_counter()
    results = []
    for model in config.models:
        for rows in config.rows:
            for product in config.products:
                results.append(measure(model, rows, product, config, (products, layer_kernels)))
                print(report_lines([results[-1]])[1], flush=True)
    device_name = torch.cuda.get_device_name(0) if config.device == "cuda" else "cpu"
    report = {
        "environment": {
            "torch": torch.__version__,
            "device": device_name,
            "commit": os.environ.get("RSD_BENCH_COMMIT", "unknown"),
        },  # fmt: skip
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(config).items()},
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    print("\n".join([f"\n{device_name}", *report_lines(results)]))
    if config.out:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "decode_products.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
