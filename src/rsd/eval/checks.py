"""What a command's arguments promise, checked before any model loads: one RSDError line each, in a moment.

Loading three checkpoints takes minutes; a typo should cost a second. `check_arguments` runs first for every
command and checks what needs no data: numbers (finite, in range), counts, the step delimiter, model paths and
server URLs, the prompt template, the shard and options that do not apply. The commands then read their data
and open their output folder (`commands.execute`), or check where they will write (`rsd grade --output`), still
before any model or grading.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

from rsd.core import RSDError

TINYWORLD = "tinyworld"

# option -> (test, what a good value is); every float option must also be finite.
FLOAT_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: v >= 0, "give 0 (greedy) or a positive temperature"),
    "sample_temperature": (lambda v: v >= 0, "give 0 or a positive temperature"),
    "top_p": (lambda v: 0 < v <= 1, "give a value in (0, 1]"),
    "p": (lambda v: 0 <= v <= 1, "a keep probability lies in [0, 1]"),
    "alpha": (lambda v: v > 0, "the logistic slope must be positive"),
    "target_share": (lambda v: 0 <= v <= 1, "give the share of steps the target should write, in [0, 1]"),
    "tolerance": (lambda v: v > 0, "give a positive share, e.g. 0.02"),
    "timeout": (lambda v: v > 0, "give the seconds a comparison may take, e.g. 5"),
}

# option -> the least value that means something.
COUNT_MINIMUMS: dict[str, tuple[int, str]] = {
    "num_problems": (1, "leave it out to run every problem"),
    "n": (1, "give the samples per problem of the N-sample methods"),
    "max_steps": (1, "a trajectory needs at least one step"),
    "step_max_tokens": (1, "a step needs at least one token"),
    "max_new_tokens": (1, "a trajectory needs at least one token"),
    "batch_size": (1, "give the problems decoded together"),
    "sd_lookahead": (1, "give the draft tokens per target check"),
    "threads": (1, "give the CPU threads for torch"),
    "grade_workers": (0, "0 grades in this process"),
    "workers": (0, "0 grades in this process"),
    "rounds": (0, "0 stops after the keep-all pass"),
    "max_question_chars": (1, "give the longest question to accept, in characters"),
}

# `localhost:8000/v1` is a server without its scheme, not a hub id: it would fail much later as one.
SCHEMELESS_SERVER = re.compile(r"^[A-Za-z0-9.-]+:\d+(/|$)")
MODEL_ROLES = ("draft", "target", "prm")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about `args` that needs neither a model nor a data file."""
    check_numbers(args)
    check_counts(args)
    if getattr(args, "delimiter", None) is not None:
        parse_delimiter(args.delimiter)
    check_models(args)
    if getattr(args, "template", None) is not None:
        from rsd.eval.prompts import load_template

        load_template(args.template)
    if getattr(args, "shard", None):
        from rsd.eval.harness import parse_shard

        parse_shard(args.shard)
    check_dataset_options(args)


def check_numbers(args: argparse.Namespace) -> None:
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RSDError(f"{option(name)} {value}: give a finite number.")
    for name, (valid, hint) in FLOAT_RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not valid(value):
            raise RSDError(f"{option(name)} {value:g}: {hint}.")


def check_counts(args: argparse.Namespace) -> None:
    for name, (least, hint) in COUNT_MINIMUMS.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise RSDError(f"{option(name)} {value}: give at least {least} ({hint}).")


def parse_delimiter(text: str) -> str:
    r"""The step delimiter as typed: escapes such as `\n` are read as the characters they stand for."""
    delimiter = text
    if "\\" in text:
        try:
            delimiter = text.encode().decode("unicode_escape")
        except UnicodeDecodeError as exc:
            raise RSDError(f"--delimiter {text!r}: {exc.reason}; write escapes like '\\n\\n' in full.") from None
    if not delimiter:
        raise RSDError("--delimiter is empty; pass a non-empty delimiter such as '\\n\\n'.")
    return delimiter


def check_models(args: argparse.Namespace) -> None:
    """Each model argument names a local checkpoint that exists, a hub id, or server URLs that parse; the device
    and dtype are ones rsd knows (whether CUDA is there is asked of torch when the models load)."""
    from rsd.hf_loading import DTYPES

    for role in MODEL_ROLES:
        value = getattr(args, role, None)
        if isinstance(value, str):
            check_model_argument(value, role)
    device = getattr(args, "device", None)
    if device is not None and not DEVICE.match(device):
        raise RSDError(f"--device {device}: unknown device; use cpu, cuda, cuda:N, mps or auto.")
    dtype = getattr(args, "dtype", None)
    if dtype is not None and dtype not in DTYPES:
        raise RSDError(f"--dtype {dtype}: unknown dtype; use one of {', '.join(DTYPES)}.")


def check_model_argument(value: str, role: str) -> None:
    from rsd.hf_loading import check_model_source

    text = value.strip()
    if text.lower().startswith(("http://", "https://")):
        from rsd.backends.openai import parse_server_urls

        parse_server_urls(text, role)
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise RSDError(f"--{role} {value!r}: rsd talks to servers over http:// or https://, not {scheme}://.")
    elif SCHEMELESS_SERVER.match(text):
        raise RSDError(f"--{role} {value!r} looks like a server address without its scheme; write http://{text}.")
    else:
        check_model_source(text, role)


def check_dataset_options(args: argparse.Namespace) -> None:
    dataset = getattr(args, "dataset", None)
    if dataset is None:
        return
    if dataset == TINYWORLD:
        given = [option(f) for f in ("question_field", "answer_field") if getattr(args, f, None)]
        if given:
            raise RSDError(
                f"{' and '.join(given)}: the tinyworld task is generated, not read from a file, so it has no fields; "
                f"drop them, or pass --dataset FILE.jsonl."
            )
    elif getattr(args, "problem_seed", None) is not None:
        raise RSDError(f"--problem-seed picks tinyworld problems; {dataset} is read from data: drop it.")


def check_output_file(path: Path, flag: str) -> None:
    """A file rsd will write at the end must be writable now, not after minutes of work."""
    if path.is_dir():
        raise RSDError(f"{flag} {path} is a folder; pass the path of a file.")
    folder = path.parent
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise RSDError(f"{flag} {path} cannot be written: {blocking} is a file, not a folder; pass another path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{path.name}.rsd-write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RSDError(f"{flag} {path} cannot be written ({exc.strerror}); pass a path you can write to.") from None
