"""`rsd eval`, `rsd sweep` and `rsd merge`: resolve the configuration, run the harness, write the run folder."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rsd.core import RSDError
from rsd.eval.datasets import DEFAULT_MAX_QUESTION_CHARS
from rsd.eval.files import atomic_output, write_atomic
from rsd.eval.harness import (
    AGGREGATES,
    METHODS,
    EvalContext,
    EvalProblem,
    MethodSpec,
    run_methods,
    select_shard,
)
from rsd.eval.report import compare_methods, report_markdown, summarize, text_table
from rsd.eval.runfolder import PLOT, REPORT, SUMMARY, RunFolder, current_records, fresh_run_dir, note
from rsd.policies import make_policy

TINYWORLD = "tinyworld"
TINYWORLD_DEFAULT_PROBLEMS = 200


# -- arguments ------------------------------------------------------------------------------------------------
def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("problems")
    from rsd.eval.datasets import BUILTIN_LAYOUTS, DATA_DIR_ENV

    group.add_argument(
        "--dataset",
        default=TINYWORLD,
        help=f"{TINYWORLD} (the built-in task, the default), a benchmark ({', '.join(BUILTIN_LAYOUTS)}: from "
        f"--data-dir or ${DATA_DIR_ENV}, else the Hugging Face hub), a JSONL path, or hf:owner/name",
    )
    group.add_argument(
        "--data-dir", default=None, help=f"folder holding NAME/test.jsonl for the benchmarks (default: ${DATA_DIR_ENV})"
    )
    group.add_argument("--question-field", default=None, help="question field of a JSONL file")
    group.add_argument("--answer-field", default=None, help="gold answer field of a JSONL file")
    group.add_argument("--num-problems", type=int, default=None, help="first N problems (tinyworld: 200)")
    group.add_argument("--problem-seed", type=int, default=None, help="tinyworld: which problems (default: --seed)")
    group.add_argument("--strict", action="store_true", help="refuse a data file with malformed rows")
    group.add_argument(
        "--max-question-chars",
        type=int,
        default=DEFAULT_MAX_QUESTION_CHARS,
        help="a longer question is a malformed row",
    )
    group.add_argument("--shard", default=None, help="i/n: run every n-th problem from i (combine with rsd merge)")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="run folder (resumes if it exists; default: a fresh one)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--grade-workers", type=int, default=2, help="grading worker processes")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("N-sample methods")
    group.add_argument("--n", type=int, default=8, help="samples per problem for best-of-n / majority")
    group.add_argument("--sample-temperature", type=float, default=0.7, help="their temperature when --temperature 0")
    group.add_argument("--sample-model", default="draft", choices=("draft", "target"), help="who samples (non-RSD)")
    group.add_argument("--aggregate", default="min", choices=AGGREGATES, help="step rewards -> solution score")


# -- building the run -----------------------------------------------------------------------------------------
def fill_model_defaults(args: argparse.Namespace) -> None:
    """No model arguments: the built-in tiny world's draft, target and PRM, on its own task only (its models
    know nothing else: on a real benchmark they would score 0% and say nothing of RSD)."""
    given = [args.draft, args.target, args.prm]
    if not any(given):
        if args.dataset != TINYWORLD:
            raise RSDError(
                f"--dataset {args.dataset} needs models: pass --draft, --target and --prm (hub ids, checkpoint "
                f"folders or server URLs); only --dataset {TINYWORLD} runs without them."
            )
        args.draft = args.target = args.prm = TINYWORLD  # each role's built-in model (rsd.hf_loading)
    elif not all(given):
        raise RSDError("pass all of --draft, --target and --prm, or none of them to run the built-in tiny world.")


def load_raw_problems(args: argparse.Namespace) -> list:
    """The run's problems (this shard's), read before any model loads: a bad data file costs a second."""
    if args.dataset == TINYWORLD:
        from rsd.tinyworld.task import load_tinyworld

        seed = args.seed if args.problem_seed is None else args.problem_seed
        count = args.num_problems or TINYWORLD_DEFAULT_PROBLEMS
        raw = load_tinyworld(split="test", n=count, seed=seed)
    else:
        from rsd.eval.datasets import load_problems

        raw = load_problems(
            args.dataset,
            data_dir=args.data_dir,
            question_field=args.question_field,
            answer_field=args.answer_field,
            strict=args.strict,
            limit=args.num_problems,
            max_question_chars=args.max_question_chars,
        )
    if not raw:
        raise RSDError(f"no problems loaded from {args.dataset}; check the name, --data-dir and the fields.")
    shard = select_shard(raw, args.shard)
    if not shard:
        raise RSDError(f"--shard {args.shard} holds none of the {len(raw)} problems; split them into fewer shards.")
    return shard


def prompted_problems(raw: list, template: str, tokenizer) -> list[EvalProblem]:
    from rsd.eval.prompts import build_prompt

    return [
        EvalProblem(
            id=str(p.id),
            question=p.question,
            answer=str(p.answer),
            prompt=build_prompt(template, p.question, tokenizer),
            meta=dict(getattr(p, "meta", {}) or {}),
        )
        for p in raw
    ]


def resolved_config(args: argparse.Namespace, methods: list[str]) -> dict:
    """Everything that decides the records (saved in config.json; a resume must match it). The problems
    themselves are checked record by record (their hash), so a bound on which rows load is not part of it."""
    skip = {"func", "command", "out", "json", "no_progress", "grade_workers", "threads", "debug", "run_dir"}
    skip |= {"max_question_chars"}
    config = {k: v for k, v in vars(args).items() if k not in skip}
    config["methods"] = methods
    return config


def versions() -> dict:
    import torch
    import transformers

    import rsd

    return {
        "rsd": getattr(rsd, "__version__", "0"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def make_context(args: argparse.Namespace, rsd_models, pool) -> EvalContext:
    from rsd.eval.grading import answers_match, extract, majority_vote

    def grader(problem: EvalProblem, text: str) -> tuple[str | None, bool]:
        choice = bool(problem.meta.get("multiple_choice", False))
        prediction = extract(text, choice)
        return prediction, answers_match([problem.answer], [prediction], multiple_choice=choice, pool=pool)[0]

    def voter(problem: EvalProblem, texts: list[str]) -> int:
        vote = majority_vote(texts, multiple_choice=bool(problem.meta.get("multiple_choice", False)), pool=pool)
        return max(vote.index, 0)

    return EvalContext(
        rsd=rsd_models,
        config=rsd_models.config,
        num_samples=args.n,
        sample_temperature=args.sample_temperature,
        sample_model=args.sample_model,
        aggregate=args.aggregate,
        grader=grader,
        voter=voter,
    )


Finish = Callable[[Path, list[dict]], None]  # more outputs of a command, written while it owns the folder


def execute(
    args: argparse.Namespace, specs: list[MethodSpec], title: str, prefix: str, finish: Finish | None = None
) -> tuple[Path, list[dict]]:
    """Check the data and the run folder, load the models, run every method on the problems not yet recorded,
    write summary and report; return them. Nothing that can be checked waits for the models."""
    from rsd.cli import build_rsd
    from rsd.eval.grading import GradingPool

    fill_model_defaults(args)
    raw = load_raw_problems(args)
    labels = [s.label for s in specs]
    config = resolved_config(args, labels)
    with RunFolder(Path(args.out) if args.out else fresh_run_dir(prefix=prefix), config) as folder:
        args.run_dir = folder.path  # Ctrl-C names it, with the command that resumes it
        rsd_models = build_rsd(args)
        problems = prompted_problems(raw, args.template, rsd_models.draft.tokenizer)
        wanted = {p.id: p.digest for p in problems}
        if message := current_records(folder.records, wanted, labels).message():
            note(f"{folder.records_path}: {message}")
        started = time.perf_counter()
        with GradingPool(workers=args.grade_workers) as pool:
            run_methods(make_context(args, rsd_models, pool), specs, problems, folder, progress=not args.no_progress)
        selection = current_records(folder.records, wanted, labels)
        summaries = summarize(selection.records, labels, config)
        comparisons = compare_methods(selection.records, summaries)
        if finish is not None:
            finish(folder.path, summaries)
        elapsed = time.perf_counter() - started
        write_outputs(folder.path, title, summaries, comparisons, config, elapsed, selection.counts())
    return folder.path, summaries


def write_outputs(
    path: Path,
    title: str,
    summaries: list[dict],
    comparisons: list[dict],
    config: dict,
    elapsed: float,
    records: dict | None = None,
    run_dir: Path | None = None,
) -> None:
    """summary.json and report.md, each replaced in one step; summary.json last, as the mark of a finished run.
    `run_dir` is the folder's name in the summary where it is written elsewhere first (a merge)."""
    summary = {
        "run_dir": str(run_dir or path),
        "methods": summaries,
        "comparisons": comparisons,
        "config": config,
        "versions": versions(),
        "elapsed_s": round(elapsed, 3),
        **({"records": records} if records is not None else {}),
    }
    write_atomic(path, REPORT, report_markdown(title, summaries, config, comparisons))
    write_atomic(path, SUMMARY, json.dumps(summary, indent=2) + "\n")


def print_result(args: argparse.Namespace, path: Path, summaries: list[dict]) -> None:
    if args.json:
        print(json.dumps(json.loads((path / SUMMARY).read_text())))
        return
    print()
    print(text_table(summaries, json.loads((path / SUMMARY).read_text())["comparisons"]))
    print(f"\nrecords, summary and report: {path}")


# -- rsd eval ---------------------------------------------------------------------------------------------------
def parse_methods(text: str) -> list[MethodSpec]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise RSDError("--methods is empty; name at least one of " + ", ".join(METHODS) + ".")
    return [MethodSpec(name, name) for name in names]


def cmd_eval(args: argparse.Namespace) -> int:
    specs = parse_methods(args.methods)
    path, summaries = execute(args, specs, f"rsd eval: {args.dataset}", "eval")
    print_result(args, path, summaries)
    return 0


# -- rsd sweep --------------------------------------------------------------------------------------------------
def sweep_specs(args: argparse.Namespace) -> list[MethodSpec]:
    """Target-only and draft-only as reference points, then RSD for each weighting function and delta."""
    try:
        deltas = [float(d) for d in args.deltas.split(",") if d.strip()]
    except ValueError:
        raise RSDError(f"--deltas {args.deltas!r}: give numbers separated by commas, e.g. 0.3,0.5,0.7.") from None
    if not all(math.isfinite(d) for d in deltas):
        raise RSDError(f"--deltas {args.deltas!r}: give finite numbers, e.g. 0.3,0.5,0.7.")
    specs = [MethodSpec("target", "target"), MethodSpec("draft", "draft")]
    for name in [p.strip() for p in args.policies.split(",") if p.strip()]:
        if name in ("threshold", "logistic"):
            for delta in deltas:
                policy = make_policy(name, delta=delta, alpha=args.alpha)
                specs.append(MethodSpec("rsd", f"rsd[{name},delta={delta:g}]", policy))
        else:
            specs.append(MethodSpec("rsd", f"rsd[{name}]", make_policy(name, alpha=args.alpha, p=args.p)))
    return specs


def cmd_sweep(args: argparse.Namespace) -> int:
    specs = sweep_specs(args)

    def plot(path: Path, summaries: list[dict]) -> None:
        from rsd.eval.plot import plot_tradeoff

        for s, spec in zip(summaries, specs, strict=True):
            s["label"] = spec.label.removeprefix("rsd[").rstrip("]")
        with atomic_output(path / PLOT) as tmp:
            plot_tradeoff(summaries, tmp, problems=args.dataset)

    path, summaries = execute(args, specs, f"rsd sweep: {args.dataset}", "sweep", finish=plot)
    print_result(args, path, summaries)
    if not args.json:
        print(f"plot: {path / PLOT}")
    return 0


# -- rsd calibrate ----------------------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    """The delta for a target share, from a keep-all pass over the problems (`rsd.calibration`)."""
    from rsd.calibration import calibrate, check_target_share
    from rsd.cli import build_rsd
    from rsd.core import Prompted

    check_target_share(args.target_share)  # before minutes of loading models
    fill_model_defaults(args)
    raw = load_raw_problems(args)
    rsd_models = build_rsd(args)
    problems = prompted_problems(raw, args.template, rsd_models.draft.tokenizer)
    prompted = [Prompted(p.id, p.question, p.prompt) for p in problems]
    result = calibrate(rsd_models, prompted, args.target_share, rounds=args.rounds, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(
        f"keep-all pass: {result.scored_steps} draft steps scored on {result.problems} problems; "
        f"delta {result.keep_all_delta:.4f} would hand the target {args.target_share:.0%} of them"
    )
    print("  target share -> delta: " + ", ".join(f"{share:.0%}: {d:.4f}" for share, d in result.table.items()))
    for i, r in enumerate(result.rounds, 1):
        print(f"round {i}: RSD at delta {r.delta:.4f} gave the target {r.target_share:.1%} of {r.steps} steps")
    achieved = "" if result.achieved_share is None else f" (the target wrote {result.achieved_share:.1%} of steps)"
    print(f"delta {result.delta:.4f}{achieved}; {result.seconds:.1f} s")
    print(f"use it: rsd eval --delta {result.delta:.4f} ... (the same models, problems and decoding options)")
    return 0


# -- rsd merge --------------------------------------------------------------------------------------------------
def cmd_merge(args: argparse.Namespace) -> int:
    """Combine the run folders of shards into one (`rsd.eval.merge`): records joined, summary recomputed."""
    from rsd.eval.merge import merge_runs

    out, summaries, merged = merge_runs(args, write_outputs)
    print_result(args, out, summaries)
    if merged.missing and not args.json:
        print(f"partial: shard {', '.join(merged.missing)} missing, as the summary and report say")
    return 0


def register(sub: argparse._SubParsersAction, add_model_arguments, add_decoding_arguments) -> None:
    def add_run_command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        add_model_arguments(parser, required=False)
        add_decoding_arguments(parser)
        add_dataset_arguments(parser)
        add_sampling_arguments(parser)
        add_output_arguments(parser)
        return parser

    ev = add_run_command("eval", "evaluate methods on a benchmark (default: the built-in tiny world)")
    ev.add_argument("--methods", default="rsd,target,draft", help=f"comma-separated: {', '.join(METHODS)}")
    ev.set_defaults(func=cmd_eval)

    sw = add_run_command("sweep", "RSD over thresholds / weighting functions, with a plot")
    sw.add_argument("--deltas", default="0.3,0.5,0.6,0.7,0.8,0.9", help="thresholds to sweep")
    sw.add_argument("--policies", default="threshold", help="weighting functions to sweep, comma-separated")
    sw.set_defaults(func=cmd_sweep)

    cal = sub.add_parser("calibrate", help="the threshold delta that hands the target a chosen share of the steps")
    add_model_arguments(cal, required=False)
    add_decoding_arguments(cal)
    add_dataset_arguments(cal)
    cal.add_argument("--target-share", type=float, default=0.3, help="share of steps the target should write")
    cal.add_argument("--rounds", type=int, default=3, help="RSD runs that correct the keep-all delta (0: none)")
    cal.add_argument("--tolerance", type=float, default=0.02, help="stop once the share is this close")
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    cal.set_defaults(func=cmd_calibrate)

    mg = sub.add_parser("merge", help="combine the run folders of --shard runs")
    mg.add_argument("runs", nargs="+", help="run folders of the shards")
    mg.add_argument("--out", required=True, help="folder of the merged run (new or empty)")
    mg.add_argument("--partial", action="store_true", help="merge even with shards missing or unfinished, and say so")
    mg.add_argument("--json", action="store_true")
    mg.set_defaults(func=cmd_merge)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `rsd` command")
