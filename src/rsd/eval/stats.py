"""The uncertainty of a run's figures: intervals on accuracies, paired tests between methods, pass@k.

Every accuracy is a share of problems solved, so it gets a Wilson score interval (95% by default), which keeps
its coverage near 100% and 0% where the normal approximation does not. Two methods run on the same problems are
compared on those problems only, by the problems one solved and the other missed (the discordant pairs):
McNemar's exact test (a two-sided binomial test on the discordant pairs) for the p-value, and Newcombe's hybrid
score interval (his method 10, built from the two Wilson intervals and the correlation of the pairs) for the
difference of accuracies. scipy computes the intervals and the binomial tests; it is imported on first use so
`rsd --help` stays fast.

References: Wilson (1927); McNemar (1947); Newcombe, "Improved confidence intervals for the difference between
binomial proportions based on paired data", Statistics in Medicine 17 (1998); Chen et al. (2021) for pass@k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95
TEST_NAME = "McNemar exact"
INTERVAL_NAME = "Wilson score"
DIFFERENCE_INTERVAL_NAME = "Newcombe paired (method 10)"


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Wilson score interval of `successes / n`; None when there are no trials."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each discordant problem is a fair coin."""
    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(a_only, discordant, 0.5).pvalue)


@dataclass
class PairedComparison:
    """Method A against method B on the problems both solved or missed: A's accuracy minus B's."""

    a: str
    b: str
    n: int  # problems both ran
    a_correct: int
    b_correct: int
    a_only: int  # problems A got right and B missed
    b_only: int  # problems B got right and A missed
    difference: float  # (a_only - b_only) / n = A's accuracy - B's, on these n problems
    ci: tuple[float, float] | None
    p_value: float
    confidence: float = CONFIDENCE
    test: str = TEST_NAME
    interval: str = DIFFERENCE_INTERVAL_NAME

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ci"] = None if self.ci is None else [round(self.ci[0], 6), round(self.ci[1], 6)]
        out["difference"] = round(self.difference, 6)
        out["p_value"] = round(self.p_value, 6)
        return out


def newcombe_paired_interval(
    both: int, a_only: int, b_only: int, neither: int, confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """Newcombe's method 10 for p_A - p_B on paired data; None without problems."""
    n = both + a_only + b_only + neither
    if n == 0:
        return None
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_interval(both + a_only, n, confidence)
    l2, u2 = wilson_interval(both + b_only, n, confidence)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    # The correlation of the two outcomes over problems; 0 where a margin is empty (it is then undefined).
    phi = (both * neither - a_only * b_only) / math.sqrt(margins) if margins else 0.0
    difference = p1 - p2
    lower = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    upper = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return max(-1.0, difference - math.sqrt(max(lower, 0.0))), min(1.0, difference + math.sqrt(max(upper, 0.0)))


def compare(a: str, b: str, a_correct: Mapping[str, bool], b_correct: Mapping[str, bool]) -> PairedComparison:
    """Pair two methods' verdicts on the problem ids both have."""
    shared = [pid for pid in a_correct if pid in b_correct]
    both = sum(a_correct[p] and b_correct[p] for p in shared)
    a_only = sum(a_correct[p] and not b_correct[p] for p in shared)
    b_only = sum(b_correct[p] and not a_correct[p] for p in shared)
    neither = len(shared) - both - a_only - b_only
    n = len(shared)
    return PairedComparison(
        a=a,
        b=b,
        n=n,
        a_correct=both + a_only,
        b_correct=both + b_only,
        a_only=a_only,
        b_only=b_only,
        difference=(a_only - b_only) / n if n else 0.0,
        ci=newcombe_paired_interval(both, a_only, b_only, neither),
        p_value=mcnemar_exact_p(a_only, b_only),
    )


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from `samples` is correct
    (the unbiased estimator of Chen et al. 2021)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def pass_at_ks(per_problem: Sequence[tuple[int, int]]) -> dict[str, float]:
    """pass@k averaged over problems, for k = 1, 2, 4, ... and the smallest sample count; keys "1", "2", ..."""
    if not per_problem:
        return {}
    most = min(samples for samples, _ in per_problem)
    ks = sorted({2**i for i in range(most.bit_length()) if 2**i <= most} | {most})
    return {
        str(k): sum(pass_at_k(samples, correct, k) for samples, correct in per_problem) / len(per_problem) for k in ks
    }
