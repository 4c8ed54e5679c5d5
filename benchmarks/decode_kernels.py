"""One decode token of rsd's engine, kernel by kernel, against the bytes it must read.

For the draft and the target of `gpu_speed.py` (random weights of the real configurations, bf16), at each row
count: rows opened in the engine's runner with blank prompts filling half of `--width` columns
(`ModelRunner.open`), then decode tokens (`ModelRunner.decode`: a CUDA-graph replay on a GPU), each round rolled
back to where it began so that every round reads the same context. Printed per model and row count: the time of
one token (median of rounds), the GPU time of its kernels grouped by kind (matrix products, attention, writes into
the arena, norms, the rest), its largest kernels, and its floor: the bytes one token must read (every weight the
forward uses, once, and the arena's keys and values) over the copy bandwidth measured on the same card. The engine
runs as it would for these models on this device (on a GPU in bf16: rsd's Triton kernels and CUDA graphs); a
change is measured by running two commits.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/decode_kernels.py --rows 1 16 64 --out $OUT
    PYTHONPATH=src python benchmarks/decode_kernels.py --tiny   # the CPU smoke test's sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_speed  # noqa: E402

from rsd.engine.kv_cache import bucket_rows  # noqa: E402
from rsd.engine.runner import ModelRunner  # noqa: E402
from rsd.hf_loading import attention_without_cudnn  # noqa: E402

# Kernel names, lower-cased, by what they do; the first kind whose words match wins, the rest is "other".
KERNEL_KINDS = (  # attention first: its kernels' names may name cutlass too
    ("attention", ("fmha", "attention", "flash", "softmax")),
    ("rotation and arena writes", ("rotate_write", "index")),
    ("norms", ("rms", "norm")),
    ("matrix products", ("gemm", "gemv", "nvjet", "xmma", "cutlass", "splitk", "dot_kernel", "decode_product")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, words in KERNEL_KINDS:
        if any(word in lowered for word in words):
            return kind
    return "other"


def copy_bandwidth_gbs(device: str) -> float | None:
    """The card's device-to-device copy bandwidth (bytes read plus bytes written, per second), median of 5: the
    rate a forward that streams its weights can reach."""
    if not device.startswith("cuda"):
        return None  # no floor on the CPU: its caches, not its memory, hold the tiny models
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(5):
        seconds, _ = gpu_speed.clocked(device, lambda: target.copy_(source))
        times.append(seconds)
    return 2 * source.numel() / statistics.median(times) / 1e9


def bytes_per_token(model: Any, rows: int, width: int) -> tuple[int, int]:
    """(weight bytes, arena bytes) one decode token reads: every parameter but an untied input embedding (a
    decode reads a row of it), and the keys and values of every layer over the bucket's rows and `width`."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding.data_ptr() != head.data_ptr():
        weights -= embedding.numel() * embedding.element_size()
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    arena = config.num_hidden_layers * 2 * bucket_rows(rows) * config.num_key_value_heads * width * head_dim
    return weights, arena * embedding.element_size()


PROFILED_TOKENS = 3  # decode tokens whose kernels are profiled (per model and row count)


def blank_rows(model: Any, rows: int, width: int, tokens: int) -> tuple[ModelRunner, torch.Tensor]:
    """A runner holding `rows` rows of blank prompts that fill half of `width` columns, with room for `tokens` decode
    tokens after them; and the ids a decode forward feeds (one per slot)."""
    runner = ModelRunner(model)
    filled = width // 2
    if tokens > width - filled:
        raise SystemExit(f"--width {width} leaves room for {width - filled} decode tokens, not {tokens}")
    runner.open([None] * rows, [[0] * filled] * rows, room=width - filled)
    return runner, torch.zeros(runner.slots, dtype=torch.long, device=runner.device)


def decoded(runner: ModelRunner, ids: torch.Tensor, tokens: int) -> None:
    """`tokens` decode forwards, then back to where they began (the same context for the next round)."""
    for _ in range(tokens):
        runner.decode(ids)
    runner.rollback([tokens] * runner.slots)


def token_ms(runner: ModelRunner, ids: torch.Tensor, device: str, replays: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        seconds, _ = gpu_speed.clocked(device, lambda: [runner.decode(ids) for _ in range(replays)])
        runner.rollback([replays] * runner.slots)
        times.append(seconds / replays)
    return 1e3 * statistics.median(times)


def kernel_table(work: Callable[[], Any], device: str, repeats: int) -> dict[str, list[float]]:
    """Per kernel name: [milliseconds, launches] per repeat of `work`, from torch.profiler (device kernels on a
    GPU, the operators' own time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    gpu_speed.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            work()
        gpu_speed.synchronize(device)
    table: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    on_gpu = device.startswith("cuda")
    for event in prof.events():
        if on_gpu and event.device_type.name == "CPU":
            continue
        micros = event.device_time_total if on_gpu else event.self_cpu_time_total
        table[event.name][0] += micros / 1e3 / repeats
        table[event.name][1] += 1 / repeats
    return dict(table)


def profile_token(runner: ModelRunner, ids: torch.Tensor, device: str, repeats: int) -> tuple[dict, str]:
    """The kernels of one token: profiled inside a graph replay where the profiler sees them, else from the
    same forward run eagerly (the same kernels, with launch gaps the replay does not have)."""
    if runner.use_graphs:
        table = kernel_table(lambda: runner.decode(ids), device, repeats)
        runner.rollback([repeats] * runner.slots)
        if sum(ms for ms, _ in table.values()) > 0:
            return table, "graph replay"
    # A decode forward run directly rewrites the same column each time (the runner's cursor stays).
    return kernel_table(lambda: runner.forward.decode(runner.arena), device, repeats), "eager forward"


def measure(model: Any, name: str, rows: int, config: argparse.Namespace, bandwidth: float | None) -> dict:
    runner, ids = blank_rows(model, rows, config.width, max(config.replays, PROFILED_TOKENS))
    weights, arena = bytes_per_token(model, rows, runner.arena.width)
    floor_ms = 1e3 * (weights + arena) / (bandwidth * 1e9) if bandwidth else None
    decoded(runner, ids, 2)  # compiles the kernels, captures the graph
    milliseconds = token_ms(runner, ids, config.device, config.replays, config.rounds)
    table, source = profile_token(runner, ids, config.device, PROFILED_TOKENS)
    kernel_ms = sum(ms for ms, _ in table.values())
    kinds: dict[str, float] = defaultdict(float)
    for kernel, (ms, _) in table.items():
        kinds[kernel_kind(kernel)] += ms
    top = sorted(table.items(), key=lambda item: -item[1][0])[: config.top]
    result = {
        "model": name,
        "rows": rows,
        "width": runner.arena.width,
        "kernels": runner.forward.kernels,  # rsd's Triton kernels (else torch operations and SDPA)
        "graphs": runner.use_graphs,
        "token_ms": milliseconds,
        "kernel_ms": kernel_ms,
        "kernel_source": source,
        "launches": sum(n for _, n in table.values()),
        "floor_ms": floor_ms,
        "floor_share": floor_ms / milliseconds if floor_ms else None,
        "weight_gib": weights / 2**30,
        "arena_gib": arena / 2**30,
        "kinds_ms": dict(kinds),
        "top_kernels": [{"name": k[:90], "ms": ms, "launches": n} for k, (ms, n) in top],
    }
    del runner
    if config.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def report_lines(results: Sequence[dict]) -> str:
    lines = [
        "model | rows | path | ms/token | kernels ms | launches | floor ms | floor/token | "
        + " | ".join(kind for kind, _ in KERNEL_KINDS)
        + " | other"
    ]
    for r in results:
        kinds = [r["kinds_ms"].get(kind, 0.0) for kind, _ in KERNEL_KINDS] + [r["kinds_ms"].get("other", 0.0)]
        lines.append(
            f"{r['model']} | {r['rows']} | {path_name(r)} | {r['token_ms']:.3f} | {r['kernel_ms']:.3f} | "
            f"{r['launches']:.0f} | {formatted(r['floor_ms'], '.3f')} | {formatted(r['floor_share'], '.0%')} | "
            + " | ".join(f"{ms:.3f}" for ms in kinds)
        )
    for r in results:
        lines.append(f"-- {r['model']} rows {r['rows']}: largest kernels ({r['kernel_source']})")
        lines.extend(f"   {k['ms']:.3f} ms  x{k['launches']:.0f}  {k['name']}" for k in r["top_kernels"])
    return "\n".join(lines)


def path_name(result: dict) -> str:
    """How the engine ran the token: rsd's Triton kernels or torch operations, replayed as a graph or not."""
    return ("triton" if result["kernels"] else "torch") + (" + graphs" if result["graphs"] else "")


def formatted(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test, seconds)")
    parser.add_argument("--models", nargs="+", choices=("draft", "target"), default=["draft", "target"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--width", type=int, default=768, help="arena columns, half of them context (default 768)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--replays", type=int, default=50, help="tokens per round (default 50)")
    parser.add_argument("--top", type=int, default=10, help="largest kernels listed per row (default 10)")
    parser.add_argument("--device", default=None, help="torch device (default cuda; cpu with --tiny)")
    parser.add_argument("--out", type=Path, help="folder for decode_kernels.json")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.tiny:
        args.rows, args.width, args.rounds, args.replays = [min(r, 2) for r in args.rows], 64, 1, 2
    return args


@torch.inference_mode()
def main(argv: Sequence[str] | None = None) -> dict:
    config = parse_args(argv)
    if config.tiny:
        torch.set_num_threads(1)  # tiny matrices run faster on one thread than on contending ones
    bench = gpu_speed.tiny_config(device=config.device) if config.tiny else gpu_speed.BenchConfig(device=config.device)
    shapes = gpu_speed.TINY_SHAPES if config.tiny else gpu_speed.REAL_SHAPES
    tokenizer = gpu_speed.make_word_tokenizer(shapes["draft"].vocab)
    dtype = getattr(torch, bench.dtype)
    started = time.perf_counter()
    bandwidth = copy_bandwidth_gbs(config.device)
    print(f"copy bandwidth: {formatted(bandwidth, '.0f')} GB/s (read + write)", flush=True)
    results = []
    with attention_without_cudnn(config.device):  # as the engine decodes
        for seed, name in enumerate(config.models):
            model = gpu_speed.build_lm(shapes[name], tokenizer, config.device, dtype, seed)
            for rows in config.rows:
                row = measure(model, name, rows, config, bandwidth)
                print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
                results.append(row)
            del model
            if config.device.startswith("cuda"):
                torch.cuda.empty_cache()
    report = {
        "environment": gpu_speed.environment(bench),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()},
        "copy_bandwidth_gbs": bandwidth,
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    print(report_lines(results))
    if config.out:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "decode_kernels.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
