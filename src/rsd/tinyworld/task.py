"""The tiny world: seeded multi-step arithmetic word problems with exact integer answers.

Every problem is a chain of operations on one running quantity. It starts with a product ("Tom has 14 boxes with
23 apples in each.") and goes on with additions and subtractions ("He buys 35 more."). The reference solution
writes one operation per step, the way math models write them, steps separated by "\\n\\n", then a final step
with `\\boxed{answer}`:

    Tom starts with 14 * 23 = 322 apples.

    Tom now has 322 + 35 = 357 apples.

    The final answer is \\boxed{357}.

The starting product (two 2-digit numbers) is the hard step kind: the small draft model gets it wrong often,
the larger target almost never, and `check_step` tells which.

Splits: a question belongs to `test` when a hash of its text falls in the test bucket, else to `train`; the
generator draws candidates from a seeded stream and keeps those of the asked split, so no question text can
ever be in both splits.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from rsd.core import DEFAULT_DELIMITER, RSDError

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
SPLITS = ("train", "test")
TEST_BUCKETS = 8  # one question text in 8 belongs to the test split
STEP_DELIMITER = DEFAULT_DELIMITER

MALE_NAMES = ("Tom", "Sam", "Leo", "Ben", "Max", "Jack", "Owen", "Eli", "Finn", "Noah")
FEMALE_NAMES = ("Mia", "Ava", "Zoe", "Lily", "Emma", "Nora", "Ruby", "Ella", "Ivy", "Lucy")
ITEMS = (
    "apples", "pens", "marbles", "stickers", "books", "cards", "coins", "shells", "cookies", "stamps",
    "beads", "crayons", "buttons", "candies", "rocks", "toys", "balloons", "pencils", "flowers", "blocks",
)  # fmt: skip
CONTAINERS = ("boxes", "bags", "jars", "packs", "baskets", "crates", "trays", "tins")
FRIENDS = ("a friend", "a neighbor", "the teacher", "a classmate", "Grandma", "the coach")

START_SENTENCES = (
    "{name} has {a} {containers} with {b} {items} in each.",
    "{name} buys {a} {containers} of {b} {items} each.",
    "{name} gets {a} {containers}, and each one holds {b} {items}.",
)
ADD_SENTENCES = (
    "{Pron} buys {n} more.",
    "{Pron} finds {n} more.",
    "{Friend} gives {obj} {n} more.",
    "{Pron} gets {n} more.",
)
SUB_SENTENCES = ("{Pron} gives away {n}.", "{Pron} loses {n}.", "{Pron} sells {n}.", "{Pron} gives {n} to {friend}.")
QUESTION_ENDS = ("How many {items} does {name} have now?", "How many {items} does {name} have in the end?")

START_STEPS = ("{name} starts with {a} * {b} = {v} {items}.", "At first {name} has {a} * {b} = {v} {items}.")
ADD_STEPS = ("{name} now has {v} + {n} = {w} {items}.", "Then {name} has {v} + {n} = {w} {items}.")
SUB_STEPS = ("{name} now has {v} - {n} = {w} {items}.", "Then {name} has {v} - {n} = {w} {items}.")
FINAL_STEP = "The final answer is \\boxed{{{w}}}."

OPERATORS = {"*": lambda x, y: x * y, "+": lambda x, y: x + y, "-": lambda x, y: x - y}
COMMUTATIVE = {"*", "+"}
EQUATION = re.compile(r"(\d+)\s*([-+*])\s*(\d+)\s*=\s*(\d+)")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Difficulty:
    """How hard the problems are: how many operations follow the starting product, and how big the numbers are."""

    min_ops: int = 3  # additions/subtractions after the starting product
    max_ops: int = 5
    count_range: tuple[int, int] = (11, 39)  # containers: the first factor of the starting product
    per_range: tuple[int, int] = (11, 99)  # items per container: the second factor
    amount_range: tuple[int, int] = (11, 99)  # what each addition or subtraction moves
    max_value: int = 9999  # the running quantity stays in [1, max_value]

    def check(self) -> None:
        ranges = (self.count_range, self.per_range, self.amount_range)
        if not 0 <= self.min_ops <= self.max_ops or any(lo < 1 or hi < lo for lo, hi in ranges):
            raise RSDError(f"invalid tiny-world difficulty {self}; use 0 <= min_ops <= max_ops and 1 <= lo <= hi.")
        if self.count_range[0] * self.per_range[0] > self.max_value:
            raise RSDError(f"invalid tiny-world difficulty {self}: the smallest product exceeds max_value.")


DEFAULT_DIFFICULTY = Difficulty()


@dataclass(frozen=True)
class Operation:
    """One arithmetic step of a problem: `left op right = result`."""

    op: str  # "*", "+" or "-"
    left: int
    right: int
    result: int

    @property
    def kind(self) -> str:
        return {"*": "mul", "+": "add", "-": "sub"}[self.op]


@dataclass(frozen=True)
class Problem:
    """One word problem with its reference solution; `answer` is a plain integer string."""

    id: str
    question: str
    answer: str
    solution_steps: tuple[str, ...]  # each step without its trailing delimiter; the last one holds \boxed{}
    operations: tuple[Operation, ...]  # operations[i] is what step i must compute; the final step has none
    split: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def solution(self) -> str:
        return STEP_DELIMITER.join(self.solution_steps)

    def step_kinds(self) -> list[str]:
        """The kind of each reference step: mul, add, sub, then final."""
        return [op.kind for op in self.operations] + ["final"]

    def to_dict(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "solution": self.solution}


# -- splits --------------------------------------------------------------------------------------------------


def split_of(question: str) -> str:
    """The split a question text belongs to, fixed by a hash of the text alone."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def problem_id(split: str, question: str) -> str:
    return f"tinyworld-{split}-{hashlib.sha256(question.encode('utf-8')).hexdigest()[:12]}"


# -- generation ----------------------------------------------------------------------------------------------


def make_problems(split: str, n: int, seed: int = 0, difficulty: Difficulty = DEFAULT_DIFFICULTY) -> list[Problem]:
    """`n` distinct problems of `split`, the same for the same (split, n, seed, difficulty).

    A prefix is stable: the first k problems of n are the k problems asked for with n = k.
    """
    if split not in SPLITS:
        raise RSDError(f"unknown tiny-world split {split!r}; use one of {', '.join(SPLITS)}.")
    if n < 0:
        raise RSDError(f"cannot make {n} tiny-world problems; ask for n >= 0.")
    difficulty.check()
    # The stream depends on the seed only, not the split: the two splits filter one stream of candidates.
    rng = random.Random(f"tinyworld:{seed}:{difficulty}")
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        problem = random_problem(rng, difficulty)
        if problem.split == split and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def load_tinyworld(split: str = "test", n: int = 200, seed: int = 0) -> list[Problem]:
    """Problems for the evaluation harness: records with `id`, `question`, `answer` (and `meta`)."""
    return make_problems(split, n, seed)


def random_problem(rng: random.Random, difficulty: Difficulty) -> Problem:
    name, pron, obj = pick_person(rng)
    words = {"name": name, "Pron": pron, "obj": obj, "items": rng.choice(ITEMS), "containers": rng.choice(CONTAINERS)}
    a, b = rng.randint(*difficulty.count_range), rng.randint(*difficulty.per_range)
    value = a * b
    sentences = [rng.choice(START_SENTENCES).format(a=a, b=b, **words)]
    steps = [rng.choice(START_STEPS).format(a=a, b=b, v=value, **words)]
    operations = [Operation("*", a, b, value)]
    for _ in range(rng.randint(difficulty.min_ops, difficulty.max_ops)):
        operation = random_operation(rng, value, difficulty)
        sentences.append(operation_sentence(rng, operation, words))
        steps.append(operation_step(rng, operation, words))
        operations.append(operation)
        value = operation.result
    sentences.append(rng.choice(QUESTION_ENDS).format(**words))
    steps.append(FINAL_STEP.format(w=value))
    question = " ".join(sentences)
    split = split_of(question)
    return Problem(
        id=problem_id(split, question),
        question=question,
        answer=str(value),
        solution_steps=tuple(steps),
        operations=tuple(operations),
        split=split,
        meta={"num_ops": len(operations)},
    )


def pick_person(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        return rng.choice(MALE_NAMES), "He", "him"
    return rng.choice(FEMALE_NAMES), "She", "her"


def random_operation(rng: random.Random, value: int, difficulty: Difficulty) -> Operation:
    """An addition or subtraction that keeps the running value within [1, max_value]."""
    lo, hi = difficulty.amount_range
    can_add = value + lo <= difficulty.max_value
    can_sub = value - lo >= 1
    op = "+" if can_add and (not can_sub or rng.random() < 0.5) else "-"
    limit = difficulty.max_value - value if op == "+" else value - 1
    amount = rng.randint(lo, min(hi, limit))
    return Operation(op, value, amount, OPERATORS[op](value, amount))


def operation_sentence(rng: random.Random, operation: Operation, words: dict) -> str:
    template = rng.choice(ADD_SENTENCES if operation.op == "+" else SUB_SENTENCES)
    friend = rng.choice(FRIENDS)
    return template.format(n=operation.right, friend=friend, Friend=friend[0].upper() + friend[1:], **words)


def operation_step(rng: random.Random, operation: Operation, words: dict) -> str:
    template = rng.choice(ADD_STEPS if operation.op == "+" else SUB_STEPS)
    return template.format(v=operation.left, n=operation.right, w=operation.result, **words)


# -- prompts and answers -------------------------------------------------------------------------------------


def chat_prompt(question: str) -> str:
    """The Qwen2.5-Math chain-of-thought prompt the generators are trained on."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def split_steps(solution: str) -> list[str]:
    """A solution's steps without their delimiters (empty pieces dropped)."""
    return [step.strip() for step in solution.split(STEP_DELIMITER) if step.strip()]


def last_boxed_value(text: str) -> str | None:
    found = BOXED.findall(text)
    return found[-1].strip() if found else None


def is_correct_answer(problem: Problem, solution: str) -> bool:
    return last_boxed_value(solution) == problem.answer


# -- step checking -------------------------------------------------------------------------------------------


def check_step(problem: Problem, previous_steps: Sequence[str], step: str) -> bool:
    """Whether `step` is a correct next step after `previous_steps`.

    Step i must compute the problem's operation i on the true values: one equation `x op y = z` with the right
    operator, the right operands (either order for + and *) and z = x op y. After the last operation comes the
    final step, which must box the true answer and nothing else. So a step that builds on an earlier wrong value
    is wrong too, even when its own arithmetic holds: its operand is not the true value. Step texts may carry
    their delimiter; wording outside the equation is not judged.
    """
    index = len(previous_steps)
    equations = EQUATION.findall(step)
    boxed = BOXED.findall(step)
    if index < len(problem.operations):
        return not boxed and len(equations) == 1 and equation_matches(equations[0], problem.operations[index])
    if index == len(problem.operations):
        return not equations and len(boxed) == 1 and boxed[0].strip() == problem.answer
    return False  # steps past the final one


def equation_matches(equation: tuple[str, str, str, str], operation: Operation) -> bool:
    left, op, right, result = equation
    x, y, z = int(left), int(right), int(result)
    if op != operation.op or z != OPERATORS[op](x, y):
        return False
    if (x, y) == (operation.left, operation.right):
        return True
    return op in COMMUTATIVE and (y, x) == (operation.left, operation.right)


def label_steps(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """check_step for every step of a solution, each against the steps before it."""
    return [check_step(problem, steps[:i], step) for i, step in enumerate(steps)]
