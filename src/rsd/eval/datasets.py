"""Benchmark problems: the built-in math test sets, any JSONL file, a Hugging Face hub dataset, or a plug-in.

Built-in names read `DATA_DIR/NAME/SPLIT.jsonl` in the layout of the Qwen2.5-Math evaluation suite, each with
its own rule for the question and the gold answer (the table in `BUILTIN_LAYOUTS`). Without a data folder
(`--data-dir` or $RSD_DATA_DIR) they load from the Hugging Face hub (`HUB_SOURCES`) through `datasets`, when it
is installed and the hub is not offline (`choose_benchmark_source`). Malformed rows are
reported with their line numbers and skipped, or refused up front with `strict=True`: a run never crashes
on row 900 of a file.

Other modules add data sets by name with `register_dataset(name, loader)`; `tinyworld`, the built-in
synthetic task, is one such loader (it generates its problems and imports `rsd.tinyworld.task` only when asked).
"""

from __future__ import annotations

import ast
import codecs
import functools
import importlib.util
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rsd.core import RSDError
from rsd.eval.grading import CHOICE_LETTERS, last_boxed

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "RSD_DATA_DIR"
MAX_LINES_LISTED = 10  # malformed lines named in one message; the rest are counted
MAX_ROW_BYTES = 16 * 2**20  # a longer line is malformed, and is read past in pieces, never held whole
DEFAULT_MAX_QUESTION_CHARS = 20_000  # a longer question is malformed (MATH-500's longest: 1.7k; OlympiadBench: 4.4k)


@dataclass
class Problem:
    """One benchmark problem: what the model is asked and the gold answer it is graded against."""

    id: str
    question: str  # the full question text; for multiple choice it lists the lettered choices
    answer: str  # the gold final answer, as text (a letter for multiple choice)
    meta: dict = field(default_factory=dict)  # dataset, line, multiple_choice, and the row's own extras

    @property
    def multiple_choice(self) -> bool:
        return bool(self.meta.get("multiple_choice", False))


@dataclass(frozen=True)
class LoadOptions:
    """What `load_problems` passes to a dataset loader."""

    name: str
    data_dir: Path | None
    split: str = "test"
    question_field: str | None = None
    answer_field: str | None = None
    strict: bool = False
    limit: int | None = None
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS


DatasetLoader = Callable[[LoadOptions], list[Problem]]

# name -> loader; `register_dataset` adds to it.
DATASET_LOADERS: dict[str, DatasetLoader] = {}


def register_dataset(name: str, loader: DatasetLoader, *, replace: bool = False) -> None:
    """Make `load_problems(name)` call `loader(options)`."""
    if name in DATASET_LOADERS and not replace and DATASET_LOADERS[name] is not loader:
        raise ValueError(f"a dataset named {name!r} is already registered; pass replace=True to override it")
    DATASET_LOADERS[name] = loader


def dataset_names() -> list[str]:
    """Every name `load_problems` accepts besides paths and hub datasets (for the CLI's help)."""
    return sorted(DATASET_LOADERS)


# ----------------------------------------------------------------------------------------------------------
# Reading rows


class BadRow(ValueError):
    """A row that cannot become a Problem; the message says why (no line number: the reader adds it)."""


def get_field(row: dict, path: str) -> object:
    """`row["a"]["b"]` for the dotted path "a.b" (a list takes an index: "choices.0"); BadRow if absent."""
    value: object = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise BadRow(f"no field {path!r} (fields: {fields})")
    return value


def as_text(value: object) -> str:
    """A field as answer text: 27.0 -> "27", a one-element list -> its element, strings stripped."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or value is None:
        raise BadRow(f"expected text or a number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float | str):
        return str(value).strip()
    raise BadRow(f"expected text or a number, got a {type(value).__name__}")


@dataclass
class _Rows:
    """The good rows of a JSONL file as (line number, row), and the bad ones as (line number, reason)."""

    good: list[tuple[int, dict]] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)


def iter_jsonl(path: Path, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, row or None, reason) for every non-blank line; 1-based line numbers.

    A line that is not UTF-8 refuses the whole file: its encoding is wrong, so the rows that did decode may be
    misread too. A line over `max_row_bytes` is malformed, and memory stays bounded whatever the file holds.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the `with` below; open() errors get their own message
    except OSError as exc:
        raise RSDError(f"cannot read {path} ({exc.strerror}); pass a JSONL file you can read.") from None
    with f:
        for number, raw in enumerate(_bounded_lines(f, max_row_bytes), start=1):
            if raw is None:
                yield number, None, f"longer than {max_row_bytes:,} bytes"
                continue
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                row, reason = _parse_row(raw, path, number)
                yield number, row, reason


def _bounded_lines(f, limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file; None for a line over `limit` bytes (the rest of it is skipped in pieces)."""
    while line := f.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := f.readline(2**20)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def _parse_row(raw: bytes, path: Path, number: int) -> tuple[dict | None, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RSDError(
            f"{path} line {number} is not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
            f"save the file as UTF-8."
        ) from None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object"
    return row, ""


def _describe_bad(source: str, bad: list[tuple[int, str]], listed: int = MAX_LINES_LISTED) -> str:
    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:listed])
    more = f"; and {len(bad) - listed} more" if len(bad) > listed else ""
    return f"{len(bad)} malformed row(s) in {source}: {shown}{more}"


RowRule = Callable[[dict], tuple[str, str, dict]]  # row -> (question, answer, extra meta)


def problems_from_rows(
    rows: Iterable[tuple[int, dict | None, str]],
    rule: RowRule,
    *,
    dataset: str,
    source: str,
    strict: bool,
    limit: int | None,
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
) -> list[Problem]:
    """Apply `rule` to each row; report (or, strict, refuse) the rows it cannot read, naming their lines.

    A file none of whose rows can be read is refused (the reasons name the fix), whatever `strict` says.
    """
    problems: list[Problem] = []
    bad: list[tuple[int, str]] = []
    for number, row, reason in rows:
        if limit is not None and len(problems) >= limit:
            break
        if row is None:
            bad.append((number, reason))
            continue
        try:
            question, answer, extra = rule(row)
            check_problem_text(question, answer, max_question_chars)
        except BadRow as exc:
            bad.append((number, str(exc)))
            continue
        meta = {"dataset": dataset, "line": number, "multiple_choice": False, **extra}
        problems.append(Problem(id=_row_id(row, number), question=question, answer=answer, meta=meta))
    if bad:
        message = _describe_bad(source, bad)
        if not problems:
            message = _describe_bad(source, bad, listed=3)  # every row: a few say why
            raise RSDError(f"{message}; no row could be read: fix the file, or name the right fields.")
        if strict:
            raise RSDError(f"{message}. Fix or delete those lines, or load without strict to skip them.")
        logger.warning("%s. Skipped them.", message)
    return _unique_ids(problems, source, strict)


def check_problem_text(question: str, answer: str, max_question_chars: int | None) -> None:
    if not question.strip():
        raise BadRow("empty question")
    if not answer.strip():
        raise BadRow("empty answer")
    if max_question_chars is not None and len(question) > max_question_chars:
        raise BadRow(f"a question of {len(question):,} characters, over --max-question-chars {max_question_chars}")


def _row_id(row: dict, number: int) -> str:
    for key in ("id", "unique_id", "idx"):
        if row.get(key) is not None and str(row[key]).strip():
            return str(row[key]).strip()
    return str(number)


def _unique_ids(problems: list[Problem], source: str, strict: bool) -> list[Problem]:
    """Ids key the records of a run: a repeated id is refused (strict) or told apart by its line, with a warning."""
    lines: dict[str, list[int]] = {}
    for p in problems:
        lines.setdefault(p.id, []).append(p.meta["line"])
    repeated = {i: numbers for i, numbers in lines.items() if len(numbers) > 1}
    if not repeated:
        return problems
    shown = "; ".join(
        f"{i!r} on lines {', '.join(map(str, numbers))}" for i, numbers in list(repeated.items())[:MAX_LINES_LISTED]
    )
    more = f"; and {len(repeated) - MAX_LINES_LISTED} more" if len(repeated) > MAX_LINES_LISTED else ""
    message = f"{len(repeated)} id(s) repeated in {source}: {shown}{more}"
    if strict:
        raise RSDError(f"{message}. Give every row its own id, or load without strict to tell them apart by line.")
    logger.warning("%s. Told them apart as ID@lineN.", message)
    for p in problems:
        if p.id in repeated:
            p.id = f"{p.id}@line{p.meta['line']}"
    return problems


# ----------------------------------------------------------------------------------------------------------
# The built-in benchmarks


@dataclass(frozen=True)
class FieldNames:
    """--question-field / --answer-field on a built-in benchmark: where its rules read, not which rules apply
    (gsm8k still takes the text after '####', mmlu_stem still turns an index into a letter)."""

    question: str | None = None
    answer: str | None = None


DEFAULT_FIELDS = FieldNames()
BuiltinRule = Callable[[dict, FieldNames], tuple[str, str, dict]]


def _first_field(row: dict, *names: str) -> str:
    for name in names:
        if row.get(name) is not None and as_text(row[name]):
            return as_text(row[name])
    raise BadRow(f"no field {' or '.join(repr(n) for n in names)} (fields: {', '.join(sorted(row))})")


def _question(row: dict, fields: FieldNames, *defaults: str) -> str:
    return as_text(get_field(row, fields.question)) if fields.question else _first_field(row, *defaults)


def _keep(row: dict, *names: str) -> dict:
    return {n: row[n] for n in names if n in row}


def _math500(row: dict, fields: FieldNames = DEFAULT_FIELDS) -> tuple[str, str, dict]:
    answer = as_text(get_field(row, fields.answer or "answer"))
    return _question(row, fields, "problem"), answer, _keep(row, "subject", "level")


def _gsm8k(row: dict, fields: FieldNames = DEFAULT_FIELDS) -> tuple[str, str, dict]:
    name = fields.answer or "answer"
    solution = str(get_field(row, name))
    if "####" not in solution:
        raise BadRow(f"field {name!r} has no '####' before the final answer")
    return _question(row, fields, "question"), solution.split("####")[-1].strip().replace(",", ""), {}


def _gaokao(row: dict, fields: FieldNames = DEFAULT_FIELDS) -> tuple[str, str, dict]:
    answer = as_text(get_field(row, fields.answer or "answer")).replace("$", "").strip()
    return _question(row, fields, "question"), answer, {}


def _olympiadbench(row: dict, fields: FieldNames = DEFAULT_FIELDS) -> tuple[str, str, dict]:
    name = fields.answer or "final_answer"
    finals = get_field(row, name)
    if not isinstance(finals, list) or not finals:
        raise BadRow(f"field {name!r} is not a non-empty list")
    question = _question(row, fields, "question")
    if row.get("context"):
        question = f"{str(row['context']).strip()}\n{question}"
    extra = _keep(row, "subfield", "unit", "answer_type", "is_multiple_answer")
    return question, as_text(finals[0]).replace("$", "").strip(), extra


def _minerva(row: dict, fields: FieldNames = DEFAULT_FIELDS) -> tuple[str, str, dict]:
    question = _question(row, fields, "problem", "question")
    if not fields.answer and "solution" not in row and "answer" in row:  # the hub's copy: the final answer alone
        return question, as_text(row["answer"]), _keep(row, "type")
    name = fields.answer or "solution"
    answer = last_boxed(str(get_field(row, name)))
    if not answer:
        raise BadRow(f"field {name!r} has no \\boxed{{}} answer")
    return question, answer, _keep(row, "type")


def _choices(row: dict) -> list[str]:
    choices = get_field(row, "choices")
    if isinstance(choices, str):  # some exports store the list as its Python repr
        try:
            choices = ast.literal_eval(choices)
        except (ValueError, SyntaxError) as exc:
            raise BadRow("field 'choices' is not a list") from exc
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise BadRow(f"field 'choices' is not a list of 2 to {len(CHOICE_LETTERS)} options")
    return [str(c).strip() for c in choices]


def _mmlu_stem(row: dict, fields: FieldNames = DEFAULT_FIELDS) -> tuple[str, str, dict]:
    choices = _choices(row)
    name = fields.answer or "answer"
    index = get_field(row, name)
    if isinstance(index, str) and index.strip().isdigit():
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(choices):
        raise BadRow(f"field {name!r} is not an index into the {len(choices)} choices")
    # The Qwen2.5-Math suite's wording, so prompts match the paper's.
    options = " ".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices))
    question = f"{_question(row, fields, 'question')}\nAnswer Choices: {options}"
    meta = {"multiple_choice": True, "choices": choices, **_keep(row, "type")}
    return question, CHOICE_LETTERS[index], meta


def _competition(row: dict, fields: FieldNames = DEFAULT_FIELDS) -> tuple[str, str, dict]:
    answer = as_text(get_field(row, fields.answer or "answer"))
    return _question(row, fields, "problem", "question"), answer, _keep(row, "url")


# name -> (row rule, where the rule comes from), the README of the benchmark data.
BUILTIN_LAYOUTS: dict[str, BuiltinRule] = {
    "math500": _math500,  # problem; answer
    "gsm8k": _gsm8k,  # question; text after #### in answer, commas removed
    "gaokao2023en": _gaokao,  # question; answer with $ stripped
    "olympiadbench": _olympiadbench,  # question; final_answer[0] with $ stripped
    "minerva_math": _minerva,  # problem; last \boxed{} of solution
    "mmlu_stem": _mmlu_stem,  # question + lettered choices; "ABCD"[answer]
    "aime24": _competition,  # problem / question; answer
    "amc23": _competition,  # problem / question; answer
}


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The benchmark folder: the argument, else $RSD_DATA_DIR."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise RSDError(
            f"no data folder given: pass --data-dir (a folder holding NAME/test.jsonl) or set {DATA_DIR_ENV}."
        )
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise RSDError(f"data folder {path} does not exist; pass --data-dir or set {DATA_DIR_ENV} to the right one.")
    return path


@dataclass(frozen=True)
class HubSource:
    """Where a built-in benchmark lives on the Hugging Face hub (its test split there)."""

    repo: str
    split: str
    config: str | None = None


# The public hub copies of the benchmarks. The Qwen2.5-Math evaluation files (read from --data-dir) are the ones
# the RSD paper used; the hub copies hold the same problems except mmlu_stem (3153 rows against 3018).
HUB_SOURCES: dict[str, HubSource] = {
    "math500": HubSource("HuggingFaceH4/MATH-500", "test"),
    "gsm8k": HubSource("openai/gsm8k", "test", "main"),
    "gaokao2023en": HubSource("MARIO-Math-Reasoning/Gaokao2023-Math-En", "train"),
    "olympiadbench": HubSource("Hothan/OlympiadBench", "train", "OE_TO_maths_en_COMP"),
    "minerva_math": HubSource("math-ai/minervamath", "test"),
    "mmlu_stem": HubSource("TIGER-Lab/MMLU-STEM", "test"),
    "aime24": HubSource("HuggingFaceH4/aime_2024", "train"),
    "amc23": HubSource("math-ai/amc23", "test"),
}
OFFLINE_ENVS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_offline(env: Mapping[str, str]) -> str | None:
    """The variable that puts the hub offline, if one does (the values huggingface_hub takes for true)."""
    return next((v for v in OFFLINE_ENVS if env.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")), None)


def choose_benchmark_source(
    name: str, data_dir: str | Path | None, env: Mapping[str, str], datasets_installed: bool
) -> Path | HubSource:
    """Where a built-in benchmark comes from: a data folder when one is given (--data-dir, else $RSD_DATA_DIR),
    else the hub when `datasets` is installed and the hub is not offline; else one error saying what to do."""
    if data_dir is not None or env.get(DATA_DIR_ENV):
        return resolve_data_dir(data_dir if data_dir is not None else env[DATA_DIR_ENV])
    hub = HUB_SOURCES[name]
    fix = f"pass --data-dir (a folder holding {name}/test.jsonl) or set {DATA_DIR_ENV}"
    offline = hub_offline(env)
    if offline:
        raise RSDError(f"no data folder for {name}, and the hub is offline ({offline}=1): {fix}.")
    if not datasets_installed:
        raise RSDError(
            f"no data folder for {name}: {fix}, or install `datasets` (pip install datasets) to load it from the "
            f"Hugging Face hub ({hub.repo})."
        )
    return hub


def _load_builtin_from_hub(hub: HubSource, rule: RowRule, options: LoadOptions) -> list[Problem]:
    import datasets  # optional and heavy: only for a benchmark loaded from the hub

    split = hub.split if options.split == "test" else options.split
    try:
        table = datasets.load_dataset(hub.repo, hub.config, split=split)
    except Exception as exc:  # no network, a moved repository: all end the same way for the user
        raise RSDError(
            f"cannot load {options.name} from the Hugging Face hub ({hub.repo}, split {split}): {first_line(exc)}; "
            f"download the files once and pass --data-dir (README: Benchmark data)."
        ) from exc
    rows = [(i, dict(row), "") for i, row in enumerate(table, start=1)]
    source = f"hub dataset {hub.repo}"
    return problems_from_rows(
        rows,
        rule,
        dataset=options.name,
        source=source,
        strict=options.strict,
        limit=options.limit,
        max_question_chars=options.max_question_chars,
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _builtin_loader(rule: BuiltinRule) -> DatasetLoader:
    def load(options: LoadOptions) -> list[Problem]:
        row_rule = functools.partial(rule, fields=FieldNames(options.question_field, options.answer_field))
        installed = importlib.util.find_spec("datasets") is not None
        folder = choose_benchmark_source(options.name, options.data_dir, os.environ, installed)
        if isinstance(folder, HubSource):
            return _load_builtin_from_hub(folder, row_rule, options)
        path = folder / options.name / f"{options.split}.jsonl"
        if not path.is_file():
            raise RSDError(
                f"{path} not found: {folder} has no {options.name}/{options.split}.jsonl; point --data-dir "
                f"(or {DATA_DIR_ENV}) at the folder of the benchmark files."
            )
        return problems_from_rows(
            iter_jsonl(path),
            row_rule,
            dataset=options.name,
            source=str(path),
            strict=options.strict,
            limit=options.limit,
            max_question_chars=options.max_question_chars,
        )

    return load


for _name, _rule in BUILTIN_LAYOUTS.items():
    register_dataset(_name, _builtin_loader(_rule))


# ----------------------------------------------------------------------------------------------------------
# Any JSONL file, any hub dataset

QUESTION_FIELDS = ("question", "problem", "prompt", "input", "query")
ANSWER_FIELDS = ("answer", "final_answer", "gt", "target")


def _field_rule(question_field: str, answer_field: str) -> RowRule:
    def rule(row: dict) -> tuple[str, str, dict]:
        return as_text(get_field(row, question_field)), as_text(get_field(row, answer_field)), {}

    return rule


def _guess_fields(row: dict, question_field: str | None, answer_field: str | None, source: str) -> RowRule:
    question_field = question_field or next((f for f in QUESTION_FIELDS if f in row), None)
    answer_field = answer_field or next((f for f in ANSWER_FIELDS if f in row), None)
    if question_field is None or answer_field is None:
        raise RSDError(
            f"cannot tell which fields of {source} hold the question and the answer (fields: "
            f"{', '.join(sorted(row))}); pass --question-field and --answer-field."
        )
    return _field_rule(question_field, answer_field)


def _load_jsonl_path(path: Path, options: LoadOptions) -> list[Problem]:
    rows = iter_jsonl(path)  # read lazily: a few problems of a huge file read a few lines
    head = []
    for item in rows:
        head.append(item)
        if item[1] is not None:
            break
    first = head[-1][1] if head else None
    if first is None:
        shown = "; ".join(f"line {n}: {why}" for n, _row, why in head[:MAX_LINES_LISTED])
        detail = f" ({shown})" if shown else ""
        raise RSDError(f"{path} holds no JSON object rows{detail}; give a JSONL file with one object per line.")
    rule = _guess_fields(first, options.question_field, options.answer_field, str(path))
    return problems_from_rows(
        itertools.chain(head, rows),
        rule,
        dataset=path.stem,
        source=str(path),
        strict=options.strict,
        limit=options.limit,
        max_question_chars=options.max_question_chars,
    )


HUB_PREFIX = "hf:"


def _load_hub(name: str, options: LoadOptions) -> list[Problem]:
    """`owner/name` or `hf:owner/name[:config]` from the Hugging Face hub (needs `datasets` and a network)."""
    try:
        import datasets  # heavy and optional: imported only when a hub dataset is asked for
    except ImportError as exc:
        raise RSDError(
            f"{name!r} is not a built-in name or a file, and loading it from the Hugging Face hub needs the "
            f"`datasets` package: pip install datasets (or download it as JSONL and pass the path)."
        ) from exc
    repo, _, config = name.removeprefix(HUB_PREFIX).partition(":")
    try:
        table = datasets.load_dataset(repo, config or None, split=options.split)
    except Exception as exc:  # no network, no such repo or split: all end the same way for the user
        raise RSDError(
            f"cannot load {repo!r} (split {options.split!r}) from the Hugging Face hub: {exc}. Check the name, "
            f"the split and the network, or download it as JSONL and pass the path."
        ) from exc
    rows = [(i, dict(row), "") for i, row in enumerate(table, start=1)]
    if not rows:
        raise RSDError(f"{repo!r} split {options.split!r} is empty; pick another split with --split.")
    rule = _guess_fields(rows[0][1], options.question_field, options.answer_field, repo)
    return problems_from_rows(
        rows,
        rule,
        dataset=repo,
        source=f"hub dataset {repo}",
        strict=options.strict,
        limit=options.limit,
        max_question_chars=options.max_question_chars,
    )


# ----------------------------------------------------------------------------------------------------------
# The entry point


TINYWORLD_DEFAULT_PROBLEMS = 200


def _tinyworld(options: LoadOptions) -> list[Problem]:
    """The built-in synthetic task (`rsd.tinyworld.task`), generated, not read: `limit` problems, seed 0."""
    try:
        from rsd.tinyworld.task import load_tinyworld
    except ImportError as exc:
        raise RSDError(f"the tinyworld task is unavailable ({exc}); reinstall rsd.") from exc
    count = options.limit if options.limit is not None else TINYWORLD_DEFAULT_PROBLEMS
    return [
        Problem(
            id=str(p.id),
            question=p.question,
            answer=str(p.answer),
            meta={"dataset": "tinyworld", "multiple_choice": False, **dict(getattr(p, "meta", {}) or {})},
        )
        for p in load_tinyworld(split=options.split, n=count)
    ]


register_dataset("tinyworld", _tinyworld)


def load_problems(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    split: str = "test",
    question_field: str | None = None,
    answer_field: str | None = None,
    strict: bool = False,
    limit: int | None = None,
    max_question_chars: int | None = DEFAULT_MAX_QUESTION_CHARS,
) -> list[Problem]:
    """The problems of a registered data set, a JSONL file (or a folder holding SPLIT.jsonl), or a hub dataset.

    Resolution order: a registered name (the built-ins read `data_dir/NAME/SPLIT.jsonl`, `data_dir` defaulting
    to $RSD_DATA_DIR); an existing path; `hf:owner/name[:config]` or `owner/name` from the hub.
    """
    if limit is not None and limit < 0:
        raise RSDError(f"limit must be >= 0 (got {limit}).")
    name = str(name_or_path)
    options = LoadOptions(
        name=name,
        data_dir=Path(data_dir) if data_dir is not None else None,
        split=split,
        question_field=question_field,
        answer_field=answer_field,
        strict=strict,
        limit=limit,
        max_question_chars=max_question_chars,
    )
    if name in DATASET_LOADERS:
        problems = DATASET_LOADERS[name](options)
    elif Path(name).expanduser().is_file():
        problems = _load_jsonl_path(Path(name).expanduser(), options)
    elif (Path(name).expanduser() / f"{split}.jsonl").is_file():
        problems = _load_jsonl_path(Path(name).expanduser() / f"{split}.jsonl", options)
    elif name.endswith((".jsonl", ".json")):
        raise RSDError(f"{name} not found; check the path (relative paths start from {Path.cwd()}).")
    elif name.startswith(HUB_PREFIX) or name.count("/") == 1:
        problems = _load_hub(name, options)
    else:
        raise RSDError(
            f"unknown dataset {name!r}: not one of {', '.join(dataset_names())}, not a file, and not a hub "
            f"name (owner/name). Pass a built-in name, a JSONL path, or hf:owner/name."
        )
    return problems[:limit] if limit is not None else problems
