"""`rsd merge`: the run folders of `--shard i/n` runs as one run, with nothing lost, doubled or half-written.

- The output is a new or empty folder: a merge never replaces anything.
- The shards are of one run (the same configuration but for the shard), each finished (its summary.json is there
  and its records hold the problems it counted), and together they cover the run (every i of i/n). A missing or
  unfinished shard is named; `--partial` merges what there is and says so in the merged summary and report.
- A line that cannot be read is an error naming the file and line (with `--partial`, dropped and named).
- The merged folder is built beside the output under a hidden name and renamed into place in one step: a kill
  at any moment leaves the output as it was (absent or empty), never part of a run. The next merge to the same
  output removes what a killed one left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rsd.core import RSDError
from rsd.eval.files import FolderLock, fsync_dir, write_atomic
from rsd.eval.harness import parse_shard
from rsd.eval.runfolder import CONFIG, RECORDS, SUMMARY, note, read_config, read_records

MERGING_MARK = ".merging-"  # in the hidden name of a merge being built: `.OUT.merging-PID`


@dataclass
class Shard:
    path: Path
    config: dict
    records: list[dict]
    summary: dict | None  # None: the shard's run has not finished
    cut: list[str]  # a cut last line of its records, dropped


@dataclass
class Merged:
    config: dict
    records: list[dict]
    missing: list[str]  # shards not given (with --partial)


def read_shard(path: Path, partial: bool) -> Shard:
    if not (path / CONFIG).is_file():
        what = "does not exist" if not path.exists() else f"is not an rsd run folder (no {CONFIG})"
        raise RSDError(f"{path} {what}; pass the run folders written by `rsd eval --shard i/n`.")
    config = read_config(path / CONFIG, hint="pass the run folders written by `rsd eval --shard i/n`.")
    if "methods" not in config:
        raise RSDError(f"{path} is not a run of rsd eval or sweep (its {CONFIG} names no methods).")
    cut: list[str] = []
    hint = "or pass --partial to merge without it."
    records = read_records(path / RECORDS, skip_corrupt=partial, hint=hint, dropped=cut)
    summary = None
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((path / SUMMARY).read_text(encoding="utf-8"))
    return Shard(path, config, records, summary if isinstance(summary, dict) else None, cut)


def last_records(records: list[dict]) -> dict[tuple[str, str], dict]:
    """The last record of each (method, problem): a resumed run appends a problem's newer record after the old."""
    return {(r["method"], r["id"]): r for r in records}


def unfinished(shard: Shard) -> str | None:
    """Why a shard is not a finished run, or None."""
    if shard.summary is None:
        return f"its run has not finished (no readable {SUMMARY})"
    latest = last_records(shard.records)
    for method in shard.summary.get("methods", []):
        have = sum(1 for m, _ in latest if m == method["method"])
        if have != method["n"]:
            cut = f" ({'; '.join(shard.cut)})" if shard.cut else ""
            counted = f"{method['n']} problems its summary counted for {method['method']}"
            return f"its records hold {have} of the {counted}{cut}"
    return None


def check_one_run(shards: list[Shard]) -> dict:
    """The configuration the shards share, but for the shard."""
    base = {k: v for k, v in shards[0].config.items() if k != "shard"}
    for shard in shards[1:]:
        if {k: v for k, v in shard.config.items() if k != "shard"} != base:
            raise RSDError(
                f"{shard.path} was run with another configuration than {shards[0].path}; merge shards of one run."
            )
    return base


def missing_shards(shards: list[Shard]) -> list[str]:
    """The shards of the run that were not given; RSDError for shards that are not one split of the problems."""
    specs = [s.config.get("shard") for s in shards]
    if all(spec is None for spec in specs) and len(shards) == 1:
        return []
    whole = next((s.path for s, spec in zip(shards, specs, strict=True) if spec is None), None)
    if whole is not None:
        raise RSDError(f"{whole} is a whole run (no --shard); merge only the shards of one --shard i/n run.")
    given: dict[tuple[int, int], Path] = {}
    for shard, spec in zip(shards, specs, strict=True):
        key = parse_shard(spec)
        if key in given:
            raise RSDError(f"shard {spec} is given twice ({given[key]} and {shard.path}); pass each shard once.")
        given[key] = shard.path
    splits = sorted({n for _, n in given})
    if len(splits) > 1:
        raise RSDError(f"the shards split the problems in {len(splits)} ways (i/{', i/'.join(map(str, splits))}).")
    n = splits[0]
    return [f"{i}/{n}" for i in range(n) if (i, n) not in given]


def combine(shards: list[Shard], partial: bool) -> Merged:
    base = check_one_run(shards)
    missing = missing_shards(shards)
    if missing and not partial:
        given = ", ".join(s.config["shard"] for s in shards)
        raise RSDError(
            f"shard {', '.join(missing)} is missing (given: {given}); pass its run folder too, or --partial to merge "
            f"the shards there are."
        )
    for shard in shards:
        if partial and shard.cut:
            note(f"{'; '.join(shard.cut)}: dropped it (--partial).")
        if why := unfinished(shard):
            if not partial:
                raise RSDError(
                    f"shard {shard.path} is unfinished: {why}; run its command again to finish it, or pass --partial."
                )
            note(f"merging the unfinished shard {shard.path} as it is (--partial): {why}.")
    merged: dict[tuple[str, str], dict] = {}
    repeated = 0
    for shard in shards:
        for key, record in last_records(shard.records).items():
            repeated += key in merged
            merged[key] = record
    if repeated:
        note(f"{repeated} (method, problem) record(s) appear in more than one shard; kept the last shard's of each.")
    config = {**base, "shard": None, "merged_from": [str(s.path) for s in shards], "missing_shards": missing}
    return Merged(config, list(merged.values()), missing)


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RSDError(f"--out {out} is a file; rsd merge writes a new folder.")
    if out.is_dir() and any(out.iterdir()):
        raise RSDError(
            f"--out {out} exists and is not empty; rsd merge writes only to a new or empty folder (it never "
            f"replaces a run): pass another --out."
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RSDError(f"--out {out} cannot be created ({exc.strerror}); pass a folder you can write to.") from None


def remove_leftovers(out: Path) -> None:
    """The hidden folders of killed merges to `out` (no process holds their lock any more)."""
    for folder in out.parent.glob(f".{out.name}{MERGING_MARK}*"):
        try:
            with FolderLock(folder).acquire("it is still being written."):
                shutil.rmtree(folder, ignore_errors=True)
        except RSDError:
            continue  # another merge is building it now
        note(f"removed {folder}, left by a merge that was killed.")


def build_in_place(out: Path, write) -> None:
    """Write the merged folder under a hidden name beside `out`, then rename it to `out` in one step."""
    check_out(out)
    remove_leftovers(out)
    building = out.parent / f".{out.name}{MERGING_MARK}{os.getpid()}"
    try:
        building.mkdir()
        with FolderLock(building).acquire("it is being written."):
            write(building)
        os.rename(building, out)  # atomic; replaces `out` only if it is an empty folder
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    fsync_dir(out.parent)


def merge_runs(args: argparse.Namespace, write_outputs) -> tuple[Path, list[dict], Merged]:
    """Read, check and combine the shards, then write the merged run; `write_outputs` writes summary and report."""
    from rsd.eval.report import compare_methods, summarize

    out = Path(args.out)
    check_out(out)
    paths = [Path(p) for p in args.runs]
    with contextlib.ExitStack() as stack:
        for path in paths:  # a shard being written is not finished: refuse it rather than read half of it
            if path.is_dir():
                stack.enter_context(FolderLock(path, shared=True).acquire("merge it once its run has ended."))
        merged = combine([read_shard(p, args.partial) for p in paths], args.partial)
    summaries = summarize(merged.records, merged.config["methods"], merged.config)
    comparisons = compare_methods(merged.records, summaries)
    title = "rsd merge" + (f" (partial: shard {', '.join(merged.missing)} missing)" if merged.missing else "")

    def write(folder: Path) -> None:
        write_atomic(folder, CONFIG, json.dumps(merged.config, indent=2, sort_keys=True) + "\n")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged.records)
        write_atomic(folder, RECORDS, lines)
        write_outputs(folder, title, summaries, comparisons, merged.config, 0.0, run_dir=out)

    build_in_place(out, write)
    return out, summaries, merged
