"""`rsd` on the command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence

from rsd.core import RSDError, Trajectory
from rsd.eval.datasets import DEFAULT_MAX_QUESTION_CHARS
from rsd.policies import DEFAULT_DELTA, POLICY_NAMES


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, unless its help already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            return text
        return super()._get_help_string(action)


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("models")
    where = (
        "hub id, local checkpoint folder, http://HOST:PORT/v1 server URLs (comma-separated replicas), or "
        "tinyworld (the built-in tiny world's model of this role; tinyworld:draft|target|prm names one)"
    )
    group.add_argument("--draft", required=required, help=f"draft model: {where}")
    group.add_argument("--target", required=required, help=f"target model: {where}")
    group.add_argument("--prm", required=required, help=f"process reward model: {where}")
    group.add_argument(
        "--prm-format",
        default=None,
        help="skywork, qwen-prm, math-shepherd, rlhflow or token-classification (default: from the config)",
    )
    for role in ("draft", "target", "prm"):
        group.add_argument(f"--{role}-tokenizer", default=None, help=f"local tokenizer for a served {role} model")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    group.add_argument(
        "--trust-remote-code", action="store_true", help="allow code from model repositories (off by default)"
    )
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 for the built-in tiny world)",
    )


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--policy", default="threshold", choices=POLICY_NAMES, help="weighting function of the reward")
    group.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="threshold of threshold/logistic")
    group.add_argument("--alpha", type=float, default=10.0, help="slope of the logistic weighting")
    group.add_argument("--p", type=float, default=0.5, help="keep probability of the constant weighting")
    group.add_argument("--template", default="qwen25-math-cot", help="prompt template name, a template file, or none")
    group.add_argument("--max-steps", type=int, default=64, help="step budget per problem")
    group.add_argument("--step-max-tokens", type=int, default=256, help="a step ends after this many tokens")
    group.add_argument("--max-new-tokens", type=int, default=2048, help="generated-token budget per problem")
    group.add_argument("--delimiter", default="\n\n", help="step delimiter (default: a blank line)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    group.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: sample from the smallest set of "
        "tokens whose probabilities sum to this (1 = all tokens; only with --temperature > 0)",
    )
    group.add_argument("--seed", type=int, default=0, help="seeds sampling and soft weighting draws")
    group.add_argument("--batch-size", type=int, default=32, help="problems decoded together")
    group.add_argument(
        "--rewrite",
        default="auto",
        choices=("auto", "speculative", "plain"),
        help="how the target writes a rejected step: verifying it, then token-level speculation with the draft "
        "(speculative: the same step in fewer target forwards; needs both in process with one tokenizer), one "
        "forward per token (plain), or speculative where it was measured to pay (auto, the default: on a GPU in "
        "calls of up to 32 rows for a draft under 0.15 of the target's parameters, else of up to 8; always on the "
        "CPU; a served vLLM target verifies greedy rejected steps where that pays: docs/serving.md)",
    )
    group.add_argument(
        "--schedule",
        default="auto",
        choices=("auto", "continuous", "lockstep"),
        help="how in-process RSD moves its rows: all together, draft then PRM then the target's rewrites (lockstep), "
        "or each on its own, the draft's forwards carrying rows drafting and rows proposing for a rewrite together "
        "(continuous: needs speculative rewrites); auto, the default: continuous with the target on a GPU. The "
        "same steps either way",
    )


def run_config(args: argparse.Namespace):
    from rsd.core import RunConfig
    from rsd.eval.checks import parse_delimiter

    return RunConfig(
        delimiter=parse_delimiter(args.delimiter),
        step_max_tokens=args.step_max_tokens,
        max_new_tokens=args.max_new_tokens,
        max_steps=args.max_steps,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise RSDError(f"--threads {threads}: give at least 1.")
        import torch

        torch.set_num_threads(threads)


def build_rsd(args: argparse.Namespace):
    from rsd.api import RSD
    from rsd.hf_loading import is_builtin_model

    quiet_libraries()
    if args.threads is None and all(is_builtin_model(m) for m in (args.draft, args.target, args.prm)):
        # Models of 1-10M parameters gain nothing from intra-op threads, and lose several-fold when another
        # process holds a core (threads wait on each other at every small matmul).
        args.threads = 1
    set_threads(args.threads)
    return RSD(
        draft=args.draft,
        target=args.target,
        prm=args.prm,
        policy=args.policy,
        delta=args.delta,
        alpha=args.alpha,
        p=args.p,
        prm_format=args.prm_format,
        config=run_config(args),
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        rewrite=args.rewrite,
        schedule=args.schedule,
        tokenizers={
            "draft": args.draft_tokenizer,
            "target": args.target_tokenizer,
            "prm": args.prm_tokenizer,
        },
    )


# -- rsd generate ---------------------------------------------------------------------------------------------
PROGRESS_FROM = 2  # questions from which `rsd generate` shows a progress bar (on stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    questions = list(args.question or [])
    if any(not q.strip() for q in questions):
        raise RSDError("--question is empty; pass the problem text, e.g. --question 'What is 2 + 3?'.")
    if args.questions:
        from rsd.questions import read_questions

        questions += read_questions(args.questions)
    if not questions:
        raise RSDError("no question given; pass --question TEXT, or --questions FILE (one per line, or JSONL).")
    check_question_lengths(questions, args.max_question_chars)
    rsd = build_rsd(args)
    bar = generation_progress(len(questions), enabled=len(questions) >= PROGRESS_FROM and not args.no_progress)
    try:
        results = rsd.generate(questions, template=args.template, method=args.method, on_finish=lambda _: bar.update())
    finally:
        bar.close()
    if args.jsonl:
        for traj in results:
            print(json.dumps(generation_json(traj), ensure_ascii=False))
    elif args.json:
        payload = [generation_json(t) for t in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, ensure_ascii=False))
    else:
        for traj in results:
            print_generation(traj)
    return 0


def check_question_lengths(questions: list[str], bound: int) -> None:
    """The character bound a data file's rows are held to, for the questions of `rsd generate` too."""
    for i, question in enumerate(questions, start=1):
        if len(question) > bound:
            raise RSDError(
                f"question {i} has {len(question):,} characters, over --max-question-chars {bound}; shorten it or "
                f"raise the bound."
            )


def generation_progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="questions", unit="question", disable=not enabled, file=sys.stderr)


def generation_json(traj: Trajectory) -> dict:
    return {
        "question": traj.question,
        "text": traj.text,
        "steps": [s.to_dict() for s in traj.steps],
        "finish_reason": traj.finish_reason,
        "stats": traj.stats.to_dict(),
    }


def print_generation(traj: Trajectory) -> None:
    print(f"Question: {traj.question}\n")
    for i, step in enumerate(traj.steps, 1):
        reward = "   -  " if step.reward is None else f"{step.reward:.3f}"
        verdict = "" if step.reward is None else (" kept" if step.kept else " rejected -> target")
        print(f"[step {i:>2} | {step.source:<6} | reward {reward}{verdict}]")
        if not step.kept and step.draft_text is not None:
            print(f"  draft proposed: {step.draft_text.strip()!r}")
        print(step.text.rstrip("\n") or "<empty step>")
        print()
    print_stats(traj)


def print_stats(traj: Trajectory) -> None:
    s = traj.stats
    acc = "n/a" if s.acceptance_rate is None else f"{s.acceptance_rate:.1%}"
    print(
        f"finished: {traj.finish_reason}   steps: {s.num_steps}   kept: {s.steps_kept}   "
        f"rejected: {s.steps_rejected}   acceptance: {acc}"
    )
    print(
        f"tokens  draft kept {s.draft_tokens_kept}  draft discarded {s.draft_tokens_discarded}  "
        f"target {s.target_tokens}  prm {s.prm_tokens}"
    )
    for role, usage in s.models.items():
        if usage.calls:
            print(
                f"{role:<7} {usage.flops:.3e} FLOPs  {usage.wall_time_s:.3f} s  "
                f"prefill {usage.prefill_tokens}  decode {usage.decode_tokens}"
            )
    print(f"total   {s.total_flops:.3e} FLOPs")


# -- parser ---------------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse's refusals in one line, like every other refusal of rsd (not the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from rsd import __version__

    parser = OneLineParser(
        prog="rsd", description="Reward-Guided Speculative Decoding for reasoning.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"rsd {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=functools.partial(OneLineParser, formatter_class=HelpFormatter),
    )

    gen = sub.add_parser("generate", help="solve questions with RSD and show every step")
    add_model_arguments(gen, required=True)
    add_decoding_arguments(gen)
    gen.add_argument("--question", action="append", help="the problem (repeat for a batch)")
    gen.add_argument(
        "--questions",
        metavar="FILE",
        help="a file of questions: one per line, or JSONL with a 'question' field; - reads stdin",
    )
    gen.add_argument(
        "--method",
        default="rsd",
        choices=("rsd", "draft", "target", "sd"),
        help="rsd, one model alone, or sd (the target alone with token-level speculation from the draft)",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object (a list for several questions)")
    gen.add_argument("--jsonl", action="store_true", help="print one JSON object per line, one per question")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar shown for several questions")
    gen.add_argument(
        "--max-question-chars", type=int, default=DEFAULT_MAX_QUESTION_CHARS, help="refuse a longer question"
    )
    gen.set_defaults(func=cmd_generate)

    from rsd.eval.commands import register
    from rsd.eval.grade_cmd import add_grade_arguments, run_grade

    register(sub, add_model_arguments, add_decoding_arguments)
    from rsd.eval.diff_cmd import register as register_diff

    register_diff(sub)

    from rsd.serve.cli import register as register_serve

    register_serve(sub, add_model_arguments, add_decoding_arguments)

    grade = sub.add_parser("grade", help="grade existing outputs in a JSONL file")
    add_grade_arguments(grade)
    grade.set_defaults(func=run_grade)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help=f"show the traceback of an error ({DEBUG_ENV}=1)")
    return parser


def quiet_libraries() -> None:
    """Progress bars of weight loading and library warnings would bury our own output and errors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


DEBUG_ENV = "RSD_DEBUG"


def error_line(exc: BaseException) -> str:
    """One line for any error: ours say what to do; the operating system's name the file; the rest ask for a
    bug report."""
    if isinstance(exc, RSDError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}; check the path, its permissions and the free space."
    elif isinstance(exc, UnicodeError):
        text = f"text that is not UTF-8 ({exc}); save the file as UTF-8."
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"unexpected {type(exc).__name__}: {first} (run again with --debug for the traceback to report)"
    return " ".join(text.splitlines())


def interrupted_line(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """Ctrl-C: where the finished work is, and the command that picks it up again."""
    folder = getattr(args, "run_dir", None)
    if folder is None or not os.path.isdir(folder):
        return "rsd: interrupted; nothing was written."
    command = ["rsd", *argv] + ([] if getattr(args, "out", None) else ["--out", str(folder)])
    return f"rsd: interrupted; finished problems are saved in {folder}; resume with: {shlex.join(command)}"


class CtrlC:
    """Ctrl-C as Python raises it (KeyboardInterrupt), remembered. Python drops an exception raised inside a
    finalizer (it prints "Exception ignored in ..."), so a Ctrl-C that lands while one runs would let the command
    go on to its end and exit 0 as if nobody had pressed it; remembered, it still ends the command as interrupted."""

    def __init__(self) -> None:
        self.pressed = False

    def __call__(self, signum: int, frame: object) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Handle SIGINT while the command runs (from the main thread only: only it may set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    from rsd.eval.checks import check_arguments

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    ctrl_c = CtrlC()
    try:
        check_arguments(args)  # before anything slow: a typo costs a second, not a model load
        with ctrl_c.watching():
            code = args.func(args)
        if ctrl_c.pressed:  # an interrupt that a finalizer swallowed: the command still ends as interrupted
            raise KeyboardInterrupt
        return code
    except KeyboardInterrupt:
        print(interrupted_line(args, argv), file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(f"rsd: error: {error_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, RSDError) else 1


if __name__ == "__main__":
    sys.exit(main())
