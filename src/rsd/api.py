"""The few lines a Python user needs: build the three models once, then generate for any questions.

from rsd import RSD
rsd = RSD(draft="Qwen/Qwen2.5-Math-1.5B-Instruct", target="Qwen/Qwen2.5-Math-7B-Instruct",
          prm="Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B", delta=0.7)
[result] = rsd.generate(["What is 17 * 23?"])
print(result.text, result.stats.acceptance_rate)

`"tinyworld"` in any slot is the built-in tiny world's model of that role (`"tinyworld:target"` names one model
anywhere): `RSD(draft="tinyworld", target="tinyworld", prm="tinyworld")` runs without a download.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from rsd.core import Prompted, RewardModel, RSDError, RunConfig, StepGenerator, Trajectory
from rsd.loop import StepwiseDecoder
from rsd.policies import DEFAULT_DELTA, Policy, make_policy

if TYPE_CHECKING:
    from rsd.calibration import Calibration

DEFAULT_TEMPLATE = "qwen25-math-cot"
REWRITES = ("auto", "speculative", "plain")  # how the target writes a step: with the draft's help, or alone
# How in-process RSD moves its rows: all together step by step, or each on its own (`rsd.continuous`); "auto" is
# continuous where the target runs on a GPU with speculative rewrites, whose forwards cost nearly the same for a few
# rows as for many, so rows that share them gain.
SCHEDULES = ("auto", "continuous", "lockstep")
# "auto" speculates on a GPU in calls of at most `AUTO_SPECULATIVE_SMALL_DRAFT_ROWS` rows when the draft has at most
# this share of the target's parameters, else in calls of at most `AUTO_SPECULATIVE_ROWS` rows. Measured on H100
# machines against plain rewrites (docs/benchmarks.md): a 1.5B draft for a 14B target (0.10) gains 1.28x at batch 1,
# 1.35x at batch 16 (calls of about 5 rows) and 1.10x at batch 64 (calls of about 20; 1.05-1.09x in three runs of
# earlier commits on three machines, whose result files are in git history). For a 7B target (0.20) it gains 1.08x
# at batch 1 and 1.07x at 16 and loses 4% at 64, where a draft forward costs a third of the target's or more.
AUTO_SPECULATIVE_DRAFT_SHARE = 0.15
AUTO_SPECULATIVE_SMALL_DRAFT_ROWS = 32
AUTO_SPECULATIVE_ROWS = 8


def load_generator(
    model: str | StepGenerator,
    role: str,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    tokenizer: str | None = None,
):
    """A `StepGenerator` from a model name or path, or served models from `http(s)://HOST:PORT/v1` URLs
    (comma-separated for replicas); a built generator passes through."""
    if not isinstance(model, str):
        return model
    from rsd.backends.openai import ServedStepGenerator, is_server_url

    if is_server_url(model):
        return ServedStepGenerator(model, role=role, tokenizer=tokenizer)
    from rsd.backends.hf import HFStepGenerator

    return HFStepGenerator(model, role=role, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def load_reward_model(
    prm: str | RewardModel | Callable,
    prm_format: str | None,
    delimiter: str,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    tokenizer: str | None = None,
) -> RewardModel:
    """A `RewardModel` from a name or path, server URLs, a built one, or any callable `(question, steps) -> reward`."""
    from rsd.backends.openai import is_server_url
    from rsd.rewards import CallableReward, load_prm

    if is_server_url(prm):
        from rsd.rewards.pooling import ServedRewardModel

        return ServedRewardModel(prm, prm_format=prm_format, tokenizer=tokenizer, delimiter=delimiter)
    if isinstance(prm, str):
        return load_prm(
            prm,
            prm_format=prm_format,
            delimiter=delimiter,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
    if hasattr(prm, "score_steps"):
        return prm
    if callable(prm):
        return CallableReward(prm)
    raise RSDError(f"prm must be a model name or path, a RewardModel or a callable, not {type(prm).__name__}.")


def check_sources(models: dict[str, object]) -> None:
    """Every model name resolvable before any is loaded: a misspelt PRM fails in a second, not after the draft
    and the target have loaded (`rsd.hf_loading.check_model_source`)."""
    from rsd.backends.openai import is_server_url
    from rsd.hf_loading import check_model_source

    for role, model in models.items():
        if isinstance(model, str) and not is_server_url(model):
            check_model_source(model, role)


def check_pair(draft: StepGenerator, target: StepGenerator) -> None:
    """Refuse a draft/target pair that shares token ids some model cannot read (it would crash mid-run)."""
    if draft.vocabulary_fingerprint() != target.vocabulary_fingerprint():
        return  # different tokenizers: the trajectory travels between them as text
    tokenizer = getattr(draft, "tokenizer", None)
    sizes = {role: getattr(gen, "vocab_size", None) for role, gen in (("draft", draft), ("target", target))}
    if tokenizer is None or None in sizes.values():
        return
    for role, size in sizes.items():
        if len(tokenizer) > size:
            raise RSDError(
                f"the draft and target cannot work together: their shared tokenizer has {len(tokenizer)} tokens "
                f"but the {role}'s embedding table only {size} rows; pick a draft and target of one model family."
            )


class RSD:
    """Reward-guided speculative decoding with a draft, a target and a PRM."""

    def __init__(
        self,
        draft: str | StepGenerator,
        target: str | StepGenerator,
        prm: str | RewardModel | Callable,
        policy: str | Policy = "threshold",
        delta: float = DEFAULT_DELTA,
        alpha: float = 10.0,
        p: float = 0.5,
        prm_format: str | None = None,
        config: RunConfig | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        tokenizers: dict[str, str] | None = None,
        rewrite: str = "auto",
        schedule: str = "auto",
    ) -> None:
        """`draft`, `target` and `prm` each take a hub id, a local folder, `http://HOST:PORT/v1` server URLs, a
        built model, "tinyworld" (the built-in model of that role) or "tinyworld:ROLE"; the PRM also takes any
        callable `(question, steps) -> reward`. `tokenizers` names a local tokenizer per role ("draft",
        "target", "prm") for served models. `rewrite`: how the target writes the steps it rewrites,
        "speculative" (verifying the rejected step, then token-level speculation with the draft: the same steps
        in fewer target forwards; needs both in process with one tokenizer), "plain" (one forward per token), or
        "auto" (speculative wherever it pays: on a GPU in calls of up to 32 or 8 rows; a served target verifies greedy
        rejected steps through its vLLM server, docs/serving.md). `schedule`: how in-process RSD moves its rows,
        "lockstep" (every row drafts its step, then the PRM scores them all, then the target rewrites the rejected
        ones while the others wait), "continuous" (each row on its own: the draft's forwards carry the rows drafting
        and the rows proposing for a rewrite together; needs speculative rewrites) or "auto" (continuous where the
        target is on a GPU and speculative rewrites run, else lockstep). Both give the same steps."""
        if rewrite not in REWRITES:
            raise RSDError(f"rewrite={rewrite!r}: choose one of {', '.join(REWRITES)}.")
        if schedule not in SCHEDULES:
            raise RSDError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}.")
        if schedule == "continuous" and rewrite == "plain":
            raise RSDError("schedule='continuous' needs speculative rewrites; use rewrite='auto' or 'speculative'.")
        tokenizers = tokenizers or {}
        check_sources({"draft": draft, "target": target, "prm": prm})
        self.config = config or RunConfig()
        self.rewrite = rewrite
        self.schedule = schedule
        if prm_format is not None:
            from rsd.rewards.formats import check_prm_format

            check_prm_format(prm_format)  # before minutes of loading the other models
        self.policy = policy if isinstance(policy, Policy) else make_policy(policy, delta=delta, alpha=alpha, p=p)
        self.draft = load_generator(draft, "draft", device, dtype, trust_remote_code, tokenizers.get("draft"))
        self.target = load_generator(target, "target", device, dtype, trust_remote_code, tokenizers.get("target"))
        check_pair(self.draft, self.target)
        self.prm = load_reward_model(
            prm, prm_format, self.config.delimiter, device, dtype, trust_remote_code, tokenizers.get("prm")
        )
        self._speculative: StepGenerator | None = None
        if rewrite == "plain" and hasattr(self.target, "verify"):
            self.target.verify = "never"  # a served target: no request scores the rejected step first
        if rewrite == "speculative" or schedule == "continuous":
            self.speculative_target()  # refuse now, not after the first rejected step

    def speculative_target(self, max_rows: int | None = None) -> StepGenerator:
        """The target writing its steps with the draft's help (`rsd.speculative`); an error naming why it cannot.
        `max_rows`: calls of more rows are written by the target alone."""
        from rsd.speculative import SpeculativeStepGenerator

        if self._speculative is None:
            self._speculative = SpeculativeStepGenerator(self.target, self.draft)
        if max_rows is None:
            return self._speculative
        return SpeculativeStepGenerator(self.target, self.draft, max_rows=max_rows)

    def sd_target(self) -> StepGenerator:
        """The target of the `sd` method, or an error naming what sd needs (--rewrite plain is RSD's fix, not sd's)."""
        from rsd.speculative import speculation_problem

        problem = speculation_problem(self.target, self.draft)
        if problem is not None:
            need, other_fix = problem
            raise RSDError(f"the sd method needs {need}; run the target method (the target alone), or {other_fix}.")
        return self.speculative_target()

    def rewriter(self) -> StepGenerator:
        """Who rewrites rejected steps: the target with speculation where `rewrite` asks for it and it can run; with
        "auto", on a GPU in calls of up to 32 rows for a draft much smaller than the target, else in calls of up to 8
        rows (`AUTO_SPECULATIVE_DRAFT_SHARE` and the row limits beside it): where it was measured to pay."""
        if self.rewrite == "plain":
            return self.target
        if self.rewrite == "speculative":
            return self.speculative_target()
        try:
            return self.speculative_target(self.auto_speculative_rows())
        except RSDError:  # served, or another tokenizer: the target alone
            return self.target

    def auto_speculative_rows(self) -> int | None:
        """The most rows of a call that "auto" rewrites with speculation (None: every call)."""
        if not str(getattr(self.target, "device", "cpu")).startswith("cuda"):
            return None
        share = self.draft.cost.parameters / max(1, self.target.cost.parameters)
        return AUTO_SPECULATIVE_SMALL_DRAFT_ROWS if share <= AUTO_SPECULATIVE_DRAFT_SHARE else AUTO_SPECULATIVE_ROWS

    def continuous(self, batch_size: int) -> bool:
        """Whether RSD's rows move each on its own (`schedule`): asked for, or "auto" with the target on a GPU,
        speculative rewrites that can run and more than one row a batch."""
        if self.schedule != "auto":
            return self.schedule == "continuous"
        from rsd.continuous import runs_continuously

        return runs_continuously(self.rewriter(), batch_size)

    @property
    def served(self) -> bool:
        """Whether any model is behind a server: then the asynchronous controller drives them."""
        return any(hasattr(m, "pool") for m in (self.draft, self.target, self.prm))

    def decoder(self, method: str = "rsd", policy: Policy | None = None, **overrides) -> StepwiseDecoder:
        """The decoder of one method: `rsd`, `draft` (draft alone), `target` (target alone, one forward per token)
        or `sd` (the target alone with token-level speculation from the draft: the same text in fewer target
        forwards). `policy` replaces RSD's weighting function for this decoder; `overrides` replace fields of the
        run configuration.

        In-process models advance in batched rounds (`StepwiseDecoder`), or for RSD each row on its own
        (`ContinuousDecoder`, `schedule`); served models advance each trajectory as soon as its own step is done
        (`AsyncStepwiseDecoder`). All give the same results.
        """
        config = replace(self.config, **overrides) if overrides else self.config
        decoder_class = StepwiseDecoder
        if self.served:
            from rsd.async_loop import AsyncStepwiseDecoder as decoder_class
        if method == "rsd":
            policy = policy or self.policy
            if self.continuous(config.batch_size):
                from rsd.continuous import ContinuousDecoder

                rewriter = self.speculative_target()
                return ContinuousDecoder(self.draft, config, self.prm, rewriter, policy, proposer_role="draft")
            return decoder_class(self.draft, config, self.prm, self.rewriter(), policy, proposer_role="draft")
        if method in ("draft", "target"):
            return decoder_class(getattr(self, method), config, proposer_role=method)
        if method == "sd":
            return decoder_class(self.sd_target(), config, proposer_role="target")
        raise RSDError(f"unknown method {method!r}; use rsd, draft, target or sd.")

    def prompt(self, question: str, template: str = DEFAULT_TEMPLATE) -> str:
        from rsd.eval.prompts import build_prompt

        return build_prompt(template, question, self.draft.tokenizer)

    def calibrate(
        self,
        questions: str | Sequence[str],
        target_share: float = 0.3,
        template: str = DEFAULT_TEMPLATE,
        rounds: int = 3,
    ) -> Calibration:
        """The threshold delta that hands the target `target_share` of the steps on these questions: a keep-all
        pass, then up to `rounds` RSD runs that correct it (`rsd.calibration`). Use it as
        `RSD(..., delta=calibration.delta)`."""
        from rsd.calibration import calibrate

        if isinstance(questions, str):
            questions = [questions]
        problems = [Prompted(i, q, self.prompt(q, template)) for i, q in enumerate(questions)]
        return calibrate(self, problems, target_share, rounds=rounds)

    def generate(
        self,
        questions: str | Sequence[str],
        template: str = DEFAULT_TEMPLATE,
        method: str = "rsd",
        on_finish: Callable[[Trajectory], None] | None = None,
    ) -> list[Trajectory]:
        """Decode each question; results come back in the order of the questions. `on_finish` is called with
        each trajectory the moment it ends (in the order they end), e.g. to advance a progress bar."""
        if isinstance(questions, str):
            questions = [questions]
        problems = [Prompted(i, q, self.prompt(q, template)) for i, q in enumerate(questions)]
        return self.decoder(method).run(problems, on_finish=on_finish)
