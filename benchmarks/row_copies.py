"""Rows copied out of the KV arena after a call: one gather per row against slices per run, side by side.

Every model call ends by copying each row's real columns out of its arena (`StaticDecoder.row_cache`), so the next
call can take another batch: 512 copies per model in a batch-64 RSD run. Until the ninth session each copy
uploaded the row's column index from pinned memory and gathered with it (`gather`); now the columns are copied run
by run from slices (`slices`, `rsd.backends.static_decode.copy_columns`), with nothing sent to the device. This
times both on an arena of the draft's real shape (Qwen2.5-Math-1.5B: 28 layers, 2 key/value heads of 128, bf16)
with every row's columns as RSD leaves them: a right-aligned prefix, then its tail and decoded tokens.

Each round copies all rows one way, then the other; medians over rounds, host clocks after a device
synchronisation. `host ms` is the time until the last copy is issued, before that synchronisation.

    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/row_copies.py --out $OUT
    PYTHONPATH=src python benchmarks/row_copies.py --device cpu   # the same on this machine's cores
    PYTHONPATH=src python benchmarks/row_copies.py --tiny         # the CPU smoke test's sizes
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_speed  # noqa: E402

from rsd.backends.static_decode import copy_columns, host_to_device  # noqa: E402

DRAFT_ARENA = dict(layers=28, kv_heads=2, head_dim=128)  # Qwen2.5-Math-1.5B
TINY_ARENA = dict(layers=2, kv_heads=2, head_dim=16)


def row_columns(rows: int, prefix_end: int, tail_end: int, seed: int) -> list[list[int]]:
    """Each row's columns after a call: a prefix of up to `prefix_end` columns right-aligned to it, then a tail of
    1-64 tokens ending at `tail_end` and the decoded tokens after it (64 a step: random text never stops early)."""
    rng = random.Random(seed)
    columns = []
    for _ in range(rows):
        prefix = rng.randrange(prefix_end // 2, prefix_end + 1)
        tail = rng.randrange(1, 65)
        columns.append(list(range(prefix_end - prefix, prefix_end)) + list(range(tail_end - tail, tail_end + 63)))
    return columns


def by_gather(arena: torch.Tensor, columns: Sequence[list[int]]) -> list[torch.Tensor]:
    """The copy before the ninth session: each row's index uploaded, then one gather."""
    return [arena[:, :, slot].index_select(3, host_to_device(cols, arena.device)) for slot, cols in enumerate(columns)]


def by_slices(arena: torch.Tensor, columns: Sequence[list[int]]) -> list[torch.Tensor]:
    """The copy as shipped (`StaticDecoder.row_cache`)."""
    return [copy_columns(arena[:, :, slot], cols) for slot, cols in enumerate(columns)]


def timed_ms(device: str, work: Callable[[], object]) -> tuple[float, float]:
    """(milliseconds until `work` returns, milliseconds until the device is done), from a synchronised start."""
    gpu_speed.synchronize(device)
    start = time.perf_counter()
    work()
    issued = time.perf_counter()
    gpu_speed.synchronize(device)
    return (issued - start) * 1e3, (time.perf_counter() - start) * 1e3


def measure(device: str, dtype: torch.dtype, shape: dict, rows: int, width: int, rounds: int) -> dict:
    prefix_end, tail_end = width // 2, width - 64
    arena_shape = (shape["layers"], 2, rows, shape["kv_heads"], width, shape["head_dim"])
    arena = torch.randn(arena_shape, dtype=dtype, device=device)
    columns = row_columns(rows, prefix_end, tail_end, seed=0)
    methods = {"gather": by_gather, "slices": by_slices}
    want = by_gather(arena, columns)
    for name, method in methods.items():  # the same values, and a warm-up of each
        if not all(torch.equal(a, b) for a, b in zip(method(arena, columns), want, strict=True)):
            raise AssertionError(f"row_copies: {name} copies other values than the gather")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            times[name].append(timed_ms(device, lambda method=method: method(arena, columns)))
    result = {
        "rows": rows,
        "width": width,
        "columns_per_row": round(statistics.mean(len(c) for c in columns), 1),
        "mib_per_call": round(sum(t.numel() * t.element_size() for t in want) / 2**20, 1),
    }
    for name, samples in times.items():
        result[f"{name}_ms"] = round(statistics.median(total for _, total in samples), 3)
        result[f"{name}_host_ms"] = round(statistics.median(host for host, _ in samples), 3)
    result["gather_over_slices"] = round(result["gather_ms"] / result["slices_ms"], 2)
    return result


def line(result: dict) -> str:
    return (
        f"{result['rows']} rows of {result['columns_per_row']} columns ({result['mib_per_call']} MiB): "
        f"gather {result['gather_ms']:.2f} ms (host {result['gather_host_ms']:.2f}), "
        f"slices {result['slices_ms']:.2f} ms (host {result['slices_host_ms']:.2f}), "
        f"gather / slices {result['gather_over_slices']:.2f}x"
    )


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--width", type=int, default=1024, help="the arena's columns (default 1024)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tiny", action="store_true", help="a tiny arena on the CPU (a smoke test)")
    parser.add_argument("--out", type=Path, help="folder for row_copies.json")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else args.device
    shape = TINY_ARENA if args.tiny else DRAFT_ARENA
    dtype = torch.bfloat16  # the arena's dtype on a GPU; a copy moves the same bytes on the CPU
    width = 256 if args.tiny else args.width
    results = []
    for rows in args.rows:
        results.append(measure(device, dtype, shape, rows, width, 3 if args.tiny else args.rounds))
        print(line(results[-1]), flush=True)
    report = {
        "environment": {**gpu_speed.environment(gpu_speed.BenchConfig(device=device)), "dtype": str(dtype)},
        "arena": shape,
        "results": results,
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "row_copies.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
