"""Verdicts: pure functions from numbers to holds / holds with caveat / off by X% / wrong.

The documents' figure is compared with ours as a signed relative error,
(claimed - observed) / observed: +4% means the documents say 4% more than we find.
Tolerances are inclusive. Nothing here knows about files or claims.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

HOLDS = "holds"
CAVEAT = "holds with caveat"
OFF = "off"
WRONG = "wrong"
# The arithmetic holds on the documents' own premise, and the premise is not how anyone trains.
PREMISE = "arithmetic holds, premise wrong"
UNCHECKED = "not yet checked"
# Ours differs beyond the tolerance, but the figure is of a setup the lab does not run (their kernels, compile, a
# chunked loss): the difference is shown and not held against the figure.
OTHER_SETUP = "another setup"
KINDS = (HOLDS, CAVEAT, OFF, WRONG, PREMISE, OTHER_SETUP, UNCHECKED)
# Float noise must not turn an error of exactly the tolerance into a miss.
_EPSILON = 1e-12


@dataclass(frozen=True)
class Verdict:
    kind: str
    error: float | None = None  # signed relative error of the documents' figure, where one applies
    reason: str = ""

    @property
    def label(self) -> str:
        if self.kind == OFF and self.error is not None:
            return f"off by {self.error * 100:+.1f}%"
        if self.kind == OTHER_SETUP and self.error is not None:
            return f"another setup: {self.error * 100:+.1f}% from ours"
        return self.kind


def relative_error(claimed: float, observed: float) -> float:
    if observed == 0:
        return 0.0 if claimed == 0 else float("inf")
    return (claimed - observed) / abs(observed)


def judge_error(error: float, tolerance: float, caveat_tolerance: float | None = None) -> Verdict:
    """Within tolerance: holds; within the wider caveat band: holds with caveat; else off by X%."""
    size = abs(error)
    if size <= tolerance + _EPSILON:
        return Verdict(HOLDS, error, f"within ±{tolerance:.0%}")
    if caveat_tolerance is not None and size <= caveat_tolerance + _EPSILON:
        return Verdict(CAVEAT, error, f"outside ±{tolerance:.0%} but within ±{caveat_tolerance:.0%}")
    band = caveat_tolerance if caveat_tolerance is not None else tolerance
    return Verdict(OFF, error, f"outside ±{band:.0%}")


def judge_value(claimed: float, observed: float, tolerance: float, caveat_tolerance: float | None = None) -> Verdict:
    return judge_error(relative_error(claimed, observed), tolerance, caveat_tolerance)


def judge_exceeds(claimed_excess: float, observed_excess: float, tolerance: float,
                  caveat_tolerance: float | None = None) -> Verdict:
    """'X does not fit; it is E over': wrong if it does fit, else the excess is compared."""
    if observed_excess <= 0:
        return Verdict(WRONG, None, "it fits: the excess is not positive")
    return judge_value(claimed_excess, observed_excess, tolerance, caveat_tolerance)


def judge_at_most(observed: float, limit: float, tolerance: float = 0.0,
                  caveat_tolerance: float | None = None) -> Verdict:
    """'At most L' (e.g. 'under 10%', 'no extra memory'): tolerances are absolute, in the value's unit."""
    if observed <= limit + tolerance + _EPSILON:
        return Verdict(HOLDS, None, "at or under the limit" if tolerance == 0 else "within the tolerance")
    if caveat_tolerance is not None and observed <= limit + caveat_tolerance + _EPSILON:
        return Verdict(CAVEAT, None, "over the tolerance but within the caveat band")
    return Verdict(WRONG, None, "over the limit")


def judge_at_least(claimed_minimum: float, observed: float, tolerance: float,
                   caveat_tolerance: float | None = None) -> Verdict:
    """'Needs at least M': holds if what we need reaches M (less tolerance); else the documents overstate."""
    if observed >= claimed_minimum * (1 - tolerance) - _EPSILON:
        return Verdict(HOLDS, None, "what we need reaches the stated minimum")
    return judge_value(claimed_minimum, observed, tolerance, caveat_tolerance)


def judge_fits(peak: float | None, capacity: float, out_of_memory: bool = False,
               headroom: float = 0.0) -> Verdict:
    """'Fits a card of C bytes': wrong on OOM or a peak over C; thin headroom is a caveat."""
    if out_of_memory or (peak is not None and peak > capacity):
        return Verdict(WRONG, None, "it does not fit")
    if peak is None:
        return Verdict(HOLDS, None, "the run completed under the cap")
    if (capacity - peak) / capacity < headroom:
        return Verdict(CAVEAT, None, f"it fits with less than {headroom:.0%} headroom")
    return Verdict(HOLDS, None, "it fits")


def judge_does_not_fit(peak: float | None, capacity: float, out_of_memory: bool = False) -> Verdict:
    """'X does not fit a card of C bytes': holds on OOM or a peak over C; wrong if it fits."""
    if out_of_memory or (peak is not None and peak > capacity):
        return Verdict(HOLDS, None, "it does not fit")
    return Verdict(WRONG, None, "it fits")


def on_premise(verdict: Verdict) -> Verdict:
    """The arithmetic judged on the documents' premise; where it holds, the premise is what is wrong."""
    if verdict.kind in (HOLDS, CAVEAT):
        return replace(verdict, kind=PREMISE)
    return verdict


def judge_statement(true: bool, caveat: str | None = None) -> Verdict:
    if not true:
        return Verdict(WRONG, None, "the statement is false")
    return Verdict(CAVEAT, None, caveat) if caveat else Verdict(HOLDS, None, "the statement is true")


def with_caveat(verdict: Verdict, caveat: str | None) -> Verdict:
    """A standing caveat turns 'holds' into 'holds with caveat'; other verdicts keep their kind."""
    if caveat and verdict.kind == HOLDS:
        return replace(verdict, kind=CAVEAT)
    return verdict


def unchecked(reason: str) -> Verdict:
    return Verdict(UNCHECKED, None, reason)
