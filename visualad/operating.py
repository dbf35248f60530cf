"""Operating points: which threshold turns scores into decisions, and what it means for the user.

A threshold set from ``n`` normal scores that are out of sample (each scored without itself as evidence) is an
order statistic of them. For exchangeable scores, a new normal part scores at or above the ``k``-th smallest
of ``n`` with probability ``(n + 1 - k) / (n + 1)``, whatever their distribution; so asking for a false-alarm
rate ``R`` gives ``k = ceil((n + 1) (1 - R))``, and the true rate of that threshold (which depends on the draw
of the ``n``) follows Beta(n + 1 - k, k): its upper ``confidence`` quantile is a distribution-free bound
(Clopper-Pearson for order statistics). With ``n < 1/R - 1`` no order statistic reaches R: the threshold goes
just above the largest score and the answer says how many normal images R needs.

No torch here: the runtime, the service and the command line share it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

#: the confidence of the stated upper bound on the true false-alarm rate
CONFIDENCE = 0.95
#: keep this many normal scores with a calibration (quantiles beyond): the page's slider shows the rate of any
#: position from them
KEPT_SCORES = 512


def _binomial_tail(n: int, a: int, x: float) -> float:
    """P(Binomial(n, x) >= a)."""
    if x <= 0.0:
        return 0.0 if a > 0 else 1.0
    if x >= 1.0:
        return 1.0
    lx, l1x = math.log(x), math.log1p(-x)
    terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lx + (n - j) * l1x
             for j in range(a, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


@functools.lru_cache(maxsize=4096)
def beta_quantile(a: int, b: int, q: float) -> float:
    """The ``q`` quantile of Beta(a, b) for whole a, b >= 1: P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _binomial_tail(a + b - 1, a, mid) < q:
            lo = mid
        else:
            hi = mid
    return hi


#: ``OperatingPoint.calibrated_on`` of a threshold the references set from their own leave-one-out scores
SELF_CALIBRATED = "references, each scored against the others"


@dataclass
class OperatingPoint:
    """A threshold and what it means: ``describe()`` is the line the summary, rows and pictures carry."""

    name: str  # "false_alarm", "percentile", "f1" or "recall"
    threshold: float
    n_normal: int
    false_alarm_rate: Optional[float]  # what was asked for (the percentile's complement for "percentile")
    expected_rate: float  # (n + 1 - k) / (n + 1): the expected rate on new normal parts (an upper value when
    #                       the threshold lies between two normal scores: ``exact`` False)
    rate_bound: float  # CONFIDENCE upper bound on the true rate, distribution-free
    calibration_rate: float  # the fraction of the calibration normals at or above the threshold
    recall: Optional[float] = None  # on the anomalous examples, when given
    target_recall: Optional[float] = None
    warning: Optional[str] = None
    exact: bool = True  # the threshold is one of the normal scores: ``expected_rate`` is the expectation itself
    calibrated_on: str = "normals"  # what the n normal scores are (SELF_CALIBRATED when the references set it)

    def describe(self) -> str:
        asked = {"false_alarm": f"threshold for {_pct(self.false_alarm_rate)} false alarms",
                 "percentile": f"threshold at the {100 * (1 - (self.false_alarm_rate or 0.0)):g}th percentile of "
                               "normal scores",
                 "f1": "F1-optimal threshold", "recall": f"threshold for {_pct(self.target_recall)} recall"}[self.name]
        expected = ("expected " if self.exact else "expected at most ") + _pct(self.expected_rate)
        text = (f"{asked}, calibrated on {self.n_normal} {self.calibrated_on} (false alarms {expected}, "
                f"at most {_pct(self.rate_bound)} with {CONFIDENCE:.0%} confidence")
        if self.recall is not None:
            text += f"; recall {_pct(self.recall)} on the anomalous examples"
        return text + ")"

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def _pct(value: Optional[float], suffix: str = "%") -> str:
    if value is None:
        return "?"
    v = 100.0 * value
    text = f"{v:.1f}".rstrip("0").rstrip(".") if v < 10 else f"{v:.0f}"
    return text + suffix


def _flagged(threshold: float, normal: np.ndarray) -> Tuple[int, bool]:
    """Of n + 1 exchangeable normal scores (the n and a new one), how many rank at or above ``threshold``, and
    whether that is exact: n - j when it is the (j+1)-th smallest score itself; else at most n + 1 - j (j scores
    lie below it)."""
    ordered = np.sort(normal)
    below = int(np.searchsorted(ordered, threshold, side="left"))
    on_a_score = below < normal.size and float(ordered[below]) == threshold
    return (normal.size - below, True) if on_a_score else (normal.size + 1 - below, False)


def describe_threshold(name: str, threshold: float, normal_scores: Sequence[float],
                       asked_rate: Optional[float] = None, anomalous_scores: Optional[Sequence[float]] = None,
                       target_recall: Optional[float] = None, warning: Optional[str] = None) -> OperatingPoint:
    """What ``threshold`` means against out-of-sample ``normal_scores`` (and recall on ``anomalous_scores``)."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    n = int(normal.size)
    if n < 1:
        raise ValueError("an operating point needs at least one normal score")
    flagged, exact = _flagged(float(threshold), normal)
    bound = 1.0 if flagged > n else beta_quantile(flagged, n + 1 - flagged, CONFIDENCE)
    recall = None
    if anomalous_scores is not None and len(anomalous_scores):
        recall = float(np.mean(np.asarray(anomalous_scores, np.float64) >= threshold))
    return OperatingPoint(name, float(threshold), n, asked_rate, flagged / (n + 1), bound,
                          float(np.mean(normal >= threshold)), recall, target_recall, warning, exact)


def normals_needed(rate: float) -> int:
    """The fewest out-of-sample normal scores that can set a threshold for a false-alarm rate ``rate``."""
    return math.ceil(1.0 / rate - 1.0 - 1e-9)


def false_alarm_threshold(normal_scores: Sequence[float], rate: float,
                          anomalous_scores: Optional[Sequence[float]] = None) -> OperatingPoint:
    """The threshold that flags a fraction ``rate`` of normal parts: the ``ceil((n + 1)(1 - rate))``-th smallest
    out-of-sample normal score; just above the largest when ``n`` is too small for ``rate`` (with a warning)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"false_alarm_rate must lie in (0, 1), got {rate!r}")
    normal = np.sort(np.asarray(normal_scores, dtype=np.float64))
    n = int(normal.size)
    k = math.ceil((n + 1) * (1.0 - rate) - 1e-9)
    warning = None
    if k > n:
        needed = normals_needed(rate)
        warning = (f"{n} normal images cannot set a threshold for {_pct(rate)} false alarms (that needs at least "
                   f"{needed}): the threshold is above every one of them, and about {_pct(1 / (n + 1))} of new normal "
                   "parts may still be flagged")
        threshold = float(np.nextafter(normal[-1], np.inf))
    else:
        threshold = float(normal[k - 1])
    return describe_threshold("false_alarm", threshold, normal, rate, anomalous_scores, warning=warning)


def recall_threshold(normal_scores: Sequence[float], anomalous_scores: Sequence[float],
                     target: float) -> OperatingPoint:
    """The highest threshold that flags at least ``target`` of the anomalous examples."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target recall must lie in (0, 1], got {target!r}")
    anomalous = np.sort(np.asarray(anomalous_scores, dtype=np.float64))
    if anomalous.size == 0:
        raise ValueError("a threshold for a target recall needs anomalous examples")
    keep = math.ceil(target * anomalous.size - 1e-9)  # flag the `keep` highest
    threshold = float(anomalous[anomalous.size - keep])
    return describe_threshold("recall", threshold, normal_scores, None, anomalous, target_recall=target)


def kept_scores(scores: Sequence[float]) -> list:
    """At most :data:`KEPT_SCORES` sorted normal scores (quantiles beyond): what the page's slider reads."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size > KEPT_SCORES:
        s = np.quantile(s, np.linspace(0.0, 1.0, KEPT_SCORES))
    return [float(v) for v in s]
