"""The claims ledger: for each claim, the analytic, simulated and measured figures, the verdict and why.

Evidence is preferred in this order: measured on a GPU, then CPU records where the claim is
device-independent, then the simulation, then the analytic formula. Probes (number formats,
quantization error, accumulation equivalence) are their own evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from harness.cards import card_bytes
from harness.claims import Claim, load_claims
from harness.measure.budget import budget_cap_bytes
from harness.report import verdicts
from harness.report.evidence import PROBE_QUANTITIES, Observation, observe
from harness.report.load import Results
from harness.report.units import fmt_bytes, fmt_value


@dataclass(frozen=True)
class LedgerRow:
    claim: Claim
    analytic: Observation | None
    simulated: Observation | None
    gpu: Observation | None
    cpu: Observation | None
    probe: Observation | None
    basis: Observation | None
    verdict: verdicts.Verdict
    why: str
    context: tuple[tuple[str, Observation], ...] = ()
    also: str = ""  # the context figures, as text
    readings: tuple[tuple[str, "LedgerRow"], ...] = ()  # the claim's other readings, judged alike


def evidence_order(claim: Claim) -> list[str]:
    if claim.evidence["quantity"] in PROBE_QUANTITIES:
        return ["probe"]
    return ["gpu"] + (["cpu"] if claim.cpu_ok else []) + ["simulated", "analytic"]


def usable_for(claim: Claim, observation: Observation | None) -> bool:
    """Whether a verdict can rest on it: a value, a true/false, or (for 'fits') an OOM."""
    if observation is None:
        return False
    if observation.value is not None or observation.holds is not None:
        return True
    return claim.compare in ("fits", "does_not_fit") and observation.status == "oom"


def judge(claim: Claim, observation: Observation) -> verdicts.Verdict:
    verdict = _judge(claim, observation)
    if claim.standing_caveat and verdict.kind == verdicts.HOLDS:
        verdict = verdicts.Verdict(verdicts.CAVEAT, verdict.error, verdict.reason)
    if claim.setup_differs and verdict.kind in (verdicts.OFF, verdicts.WRONG):
        verdict = verdicts.Verdict(verdicts.OTHER_SETUP, verdict.error,
                                   f"{verdict.reason}, against a setup the lab does not run ({claim.setup_differs})")
    return verdict


def _judge(claim: Claim, observation: Observation) -> verdicts.Verdict:
    tolerance, band, figure = claim.tolerance, claim.caveat_tolerance, claim.figure_value
    if claim.qualitative and claim.compare in ("at_least", "at_most"):
        below = observation.value < figure
        holds = (not below) if claim.compare == "at_least" else below
        return verdicts.Verdict(verdicts.HOLDS if holds else verdicts.WRONG, None,
                                "the direction holds" if holds else "the other way round")
    if claim.unit == "sequences" and observation.value == 0:  # "only one fits" says one does
        return verdicts.Verdict(verdicts.WRONG, None, "not even one sequence fits")
    if claim.compare == "equals":
        verdict = verdicts.judge_value(figure, observation.value, tolerance, band)
    elif claim.compare == "premise":
        verdict = verdicts.on_premise(verdicts.judge_value(figure, observation.value, tolerance, band))
    elif claim.compare == "exceeds":
        verdict = verdicts.judge_exceeds(figure, observation.value, tolerance, band)
    elif claim.compare == "at_most":
        verdict = verdicts.judge_at_most(observation.value, figure, tolerance, band)
    elif claim.compare == "at_least":
        verdict = verdicts.judge_at_least(figure, observation.value, tolerance, band)
    elif claim.compare == "fits":
        capacity = observation.capacity or budget_cap_bytes(figure / 1e9, "cuda")
        verdict = verdicts.judge_fits(observation.value, capacity, observation.status == "oom", tolerance)
    elif claim.compare == "does_not_fit":
        capacity = observation.capacity or budget_cap_bytes(figure / 1e9, "cuda")
        verdict = verdicts.judge_does_not_fit(observation.value, capacity, observation.status == "oom")
    elif claim.compare == "statement":
        verdict = verdicts.judge_statement(bool(observation.holds), claim.caveat)
    elif claim.compare == "error":
        verdict = verdicts.judge_error(observation.value, tolerance, band)
    else:  # claims.py rejects unknown comparisons; this guards new ones
        raise ValueError(f"unknown comparison {claim.compare!r}")
    return verdicts.with_caveat(verdict, observation.caveat)


def basis_label(observation: Observation | None) -> str:
    """The evidence a verdict rests on, as a sentence's subject."""
    if observation is None:
        return "no evidence"
    label = {
        "gpu": f"the run measured on {observation.device}",
        "cpu": "a CPU run (tracked tensor bytes, not a GPU figure)",
        "simulated": "the simulation (fake-tensor trace of the real step)",
        "analytic": "the analytic formula",
        "probe": f"the probe on {observation.device} (device-independent)",
    }[observation.method]
    if observation.extra.get("derived"):  # arithmetic on the evidence is named, never passed off as it
        return f"a figure derived from {label} ({observation.extra['derived']})"
    return label


def basis_short(observation: Observation | None) -> str:
    """The same, for a table cell."""
    if observation is None:
        return "none yet"
    if observation.method == "gpu" and observation.extra.get("derived"):
        return f"derived from measured ({observation.device})"
    return {"gpu": f"measured ({observation.device})", "cpu": "CPU tracked bytes", "simulated": "simulated",
            "analytic": "analytic", "probe": f"probe ({observation.device})"}[observation.method]


def _ours(claim: Claim, observation: Observation) -> str:
    if observation.value is None:
        return observation.note or observation.status
    return fmt_value(observation.value, observation.extra.get("unit", claim.unit))


def explain(claim: Claim, observation: Observation | None, verdict: verdicts.Verdict) -> str:
    """One sentence saying why the verdict is what it is."""
    if observation is None:
        return f"No evidence recorded yet; it comes from {claim.needs}."
    basis = basis_label(observation)
    basis = basis[0].upper() + basis[1:]
    if claim.compare == "error" and verdict.error is not None:
        text = (f"{basis}: {observation.note}; under it {claim.whose} {claim.figure_text} are "
                f"{verdict.error * 100:+.1f}% off, {verdict.reason}")
    elif claim.compare == "premise" and verdict.error is not None:
        text = (f"On {claim.whose} premise ({claim.premise}), {basis[0].lower() + basis[1:]} gives "
                f"{_ours(claim, observation)} ({observation.source}); their {claim.figure_text} is "
                f"{verdict.error * 100:+.1f}% from it, {verdict.reason}")
        text += f"; the premise {'is what fails' if verdict.kind == verdicts.PREMISE else 'fails too'}: {claim.explain}"
    elif claim.compare in ("equals", "exceeds", "at_least") and verdict.error is not None:
        text = (f"{basis} gives {_ours(claim, observation)} ({observation.source}); {claim.whose} "
                f"{claim.figure_text} is {verdict.error * 100:+.1f}% from it, {verdict.reason}")
    elif claim.compare in ("fits", "does_not_fit"):
        card_gb = claim.figure_value / 1e9
        capacity = observation.capacity or budget_cap_bytes(card_gb, "cuda")
        peak = (f"peak {fmt_bytes(observation.value)}" if observation.value is not None
                else observation.note or observation.status)
        rule = observation.extra.get("capacity_rule")
        room = (f"the {fmt_bytes(capacity)} cap its run had for a {card_gb:g} GB card ({rule}; as the lab now "
                f"counts the card, {fmt_bytes(card_bytes(card_gb))}, it leaves "
                f"{fmt_bytes(budget_cap_bytes(card_gb, 'cuda'))})" if rule else
                f"the {fmt_bytes(capacity)} a {card_gb:g} GB card leaves to the allocator")
        text = f"{basis} ({observation.source}): {peak} against {room}; {verdict.reason}"
    elif claim.compare == "statement":
        text = f"{basis}: {observation.note or observation.source}"
    else:  # at_most, and a value-free exceeds
        text = (f"{basis} gives {_ours(claim, observation)} ({observation.source}"
                f"{'; ' + observation.note if observation.note else ''}) against {claim.whose} "
                f"{claim.figure_text}: {verdict.reason}")
    if verdict.kind == verdicts.CAVEAT:
        caveat = observation.caveat or claim.caveat
        if caveat:  # a verdict in the caveat band alone already says so in its reason
            text += f"; caveat: {caveat}"
    elif verdict.kind in (verdicts.OFF, verdicts.WRONG, verdicts.OTHER_SETUP) and (claim.explain or claim.caveat) \
            and claim.compare != "premise":
        text += f": {claim.explain or claim.caveat}"
    return text + "."


def also(claim: Claim, context: tuple[tuple[str, Observation], ...]) -> str:
    """The context figures, beside the reason: "label: figure (method); ..."."""
    return "; ".join(f"{label}: {_ours(claim, obs)} ({'derived from ' if obs.extra.get('derived') else ''}"
                     f"{obs.method})" for label, obs in context)


def _context(claim: Claim, results: Results, order: list[str]) -> tuple[tuple[str, Observation], ...]:
    found = []
    for spec in claim.context:
        for method in order:
            observation = observe(results, spec, method)
            if observation is not None and observation.value is not None:
                if spec.get("unit"):  # a context figure in another unit than the claim's
                    observation = replace(observation, extra={**observation.extra, "unit": spec["unit"]})
                found.append((spec["label"], observation))
                break
    return tuple(found)


def build_row(claim: Claim, results: Results) -> LedgerRow:
    order = evidence_order(claim)
    seen = {method: observe(results, claim.evidence, method) for method in order}
    basis = next((seen[m] for m in order if usable_for(claim, seen[m])), None)
    verdict = judge(claim, basis) if basis is not None else verdicts.unchecked(claim.needs)
    context = _context(claim, results, order)
    readings = tuple((label, build_row(reading, results)) for label, reading in claim.readings)
    return LedgerRow(claim, seen.get("analytic"), seen.get("simulated"), seen.get("gpu"), seen.get("cpu"),
                     seen.get("probe"), basis, verdict, explain(claim, basis, verdict), context, also(claim, context),
                     readings)


def build_ledger(results: Results, claims: list[Claim] | None = None) -> list[LedgerRow]:
    return [build_row(claim, results) for claim in (claims if claims is not None else load_claims())]
