"""The ledgers' claims, as data (no torch): claims.yaml holds the documents' figures, published.yaml
other projects', both in the project's words. The report judges them; `harness predict
--claims` predicts every configuration they read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
# Other projects' published figures, checked the same way (a second ledger).
PUBLISHED_FILE = Path(__file__).with_name("published.yaml")
COMPARISONS = ("equals", "exceeds", "at_most", "at_least", "fits", "does_not_fit", "premise", "statement", "error")
SOURCES = {
    "TW": "The Way of Fine-Tuning",
    "DM": "Demystifying LLMs: Fine-Tuning Your Own LLM, Part 1",
}


@dataclass(frozen=True)
class Claim:
    id: str
    sources: tuple[str, ...]
    claim: str
    figure_value: float | None
    unit: str
    figure_text: str
    model: str
    compare: str
    tolerance: float
    evidence: dict
    needs: str
    caveat_tolerance: float | None = None
    caveat: str | None = None
    explain: str | None = None
    cpu_ok: bool = False
    context: tuple[dict, ...] = ()
    published: dict | None = field(default=None)
    quote: str | None = None  # the documents' own words the verdict is decided from
    premise: str | None = None  # for "premise": the scenario the documents' arithmetic assumes
    metric: str | None = None   # what a published figure is (an estimate, peak allocated, reserved, ...)
    whose: str = "the documents'"  # how the reasons name the figure's owner
    # Another fair reading of the same words, judged and shown beside the verdict (which is the
    # claim's own reading): (label, the claim as that reading has it).
    readings: tuple[tuple[str, "Claim"], ...] = ()
    # A claim of direction only ("faster", "less than LoRA"): answered in a sentence, never as a percentage.
    qualitative: bool = False
    # The claim's caveat stands whatever the figure (it holds only in a case most runs are not in).
    standing_caveat: bool = False
    # Where the documents count "7B" as this many parameters: the claim is judged on our own figure for
    # the real model, and a reading beside it on ours scaled to this count (their arithmetic alone).
    parameters_counted: float | None = None
    # What the lab's run of a published figure's configuration does not reproduce (their kernels, compile, a chunked
    # loss): a difference beyond the tolerance is then "another setup", not a verdict on their figure.
    setup_differs: str | None = None

    @property
    def tolerance_text(self) -> str:
        if self.qualitative:
            return "direction only"
        if self.compare == "statement":
            return "exact (true or false)"
        if self.compare == "at_most":
            if not self.tolerance and self.caveat_tolerance is None:
                return "strict limit"
            band = f", caveat ≤ +{self._amount(self.caveat_tolerance)}" if self.caveat_tolerance is not None else ""
            return f"≤ +{self._amount(self.tolerance)}{band}"
        if self.compare == "fits":
            return f"fits; ≥{self.tolerance:.0%} headroom"
        if self.compare == "does_not_fit":
            return "over the card"
        band = f", caveat ±{self.caveat_tolerance:.0%}" if self.caveat_tolerance is not None else ""
        return f"±{self.tolerance:.0%}{band}"

    def _amount(self, value: float) -> str:
        """An absolute tolerance in the claim's unit (fractions as percentages)."""
        return f"{value:.0%}" if self.unit == "fraction" else f"{value:g}"


# The label of the reading a claim's `parameters_counted` adds (see `counted_reading`).
COUNTED_READING = "their arithmetic alone: ours scaled to the {count:g}e9 parameters they count"


def parse_claim(entry: dict, sources: dict = SOURCES, whose: str = "the documents'") -> Claim:
    """One claims.yaml entry; a reading overrides the claim's figure, comparison and evidence."""
    figure = entry["figure"]
    readings = [*(entry.get("readings") or ()), *counted_reading(entry)]
    if entry["compare"] not in COMPARISONS:
        raise ValueError(f"claim {entry['id']}: compare must be one of {COMPARISONS}, not {entry['compare']!r}")
    unknown = set(entry["sources"]) - set(sources)
    if unknown:
        raise ValueError(f"claim {entry['id']}: unknown source(s) {sorted(unknown)}")
    return Claim(
        id=entry["id"], sources=tuple(entry["sources"]), claim=entry["claim"], figure_value=_figure_value(figure),
        unit=figure["unit"], figure_text=figure["text"], model=entry["model"], compare=entry["compare"],
        tolerance=float(entry["tolerance"]), evidence=dict(entry["evidence"]), needs=entry["needs"],
        caveat_tolerance=None if entry.get("caveat_tolerance") is None else float(entry["caveat_tolerance"]),
        caveat=entry.get("caveat"), explain=entry.get("explain"), cpu_ok=bool(entry.get("cpu_ok", False)),
        context=tuple(entry.get("context") or ()), published=entry.get("published"),
        quote=entry.get("quote"), premise=entry.get("premise"), metric=entry.get("metric"), whose=whose,
        qualitative=bool(entry.get("qualitative", False)), standing_caveat=bool(entry.get("standing_caveat", False)),
        parameters_counted=None if entry.get("parameters_counted") is None else float(entry["parameters_counted"]),
        setup_differs=entry.get("setup_differs"),
        readings=tuple((reading["label"], parse_claim({**_own_fields(entry), **reading}, sources, whose))
                       for reading in readings),
    )


def _figure_value(figure: dict) -> float | None:
    """The figure's value; a card (`card_gb: N`, a card sold as N GB) is the bytes the lab counts for it
    (harness.cards.card_bytes, the one convention of the fit table, the budget runs and the ledger)."""
    if figure.get("card_gb") is not None:
        from harness.cards import card_bytes

        return float(card_bytes(float(figure["card_gb"])))
    return None if figure.get("value") is None else float(figure["value"])


def counted_reading(entry: dict) -> list[dict]:
    """Where the documents count "7B" as `parameters_counted` parameters, the reading that judges their
    arithmetic alone: the claim itself (figure, comparison, tolerances, caveats) with its evidence scaled
    to that count (harness/report/evidence.py, `as_counted`). The claim's own verdict rests on our
    unscaled figure for the real model, so the rounding counts against them there and only there."""
    count = entry.get("parameters_counted")
    if count is None:
        return []
    keep = ("figure", "compare", "tolerance", "caveat_tolerance", "caveat", "explain", "premise", "standing_caveat",
            "qualitative", "cpu_ok")
    return [{**{key: entry[key] for key in keep if key in entry},
             "label": COUNTED_READING.format(count=float(count) / 1e9),
             "evidence": {**entry["evidence"], "parameters_counted": float(count)}}]


def _own_fields(entry: dict) -> dict:
    """What a reading inherits from its claim: identity and wording, not the claim's evidence extras."""
    return {key: entry[key] for key in ("id", "sources", "claim", "model", "needs") if key in entry}


def load_claims(path: Path = CLAIMS_FILE) -> list[Claim]:
    """The claims of a file; a file of other projects' figures names its own `sources`."""
    data = yaml.safe_load(Path(path).read_text())
    sources = data.get("sources") or SOURCES
    whose = data.get("whose", "the documents'")
    claims = [parse_claim(entry, sources, whose) for entry in data["claims"]]
    ids = [c.id for c in claims]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{Path(path).name}: duplicate claim IDs")
    return claims


def load_sources(path: Path) -> dict[str, str]:
    return yaml.safe_load(Path(path).read_text()).get("sources") or SOURCES


def evidence_configurations(claims: list[Claim]) -> list[tuple[str, str, int, int]]:
    """(experiment, model, seq_len, micro-batch) of every evidence and context the claims and their
    readings read at one shape: what `harness predict --claims` must have predicted."""
    found = []
    for claim in claims:
        specs = [claim.evidence, *claim.context, *(reading.evidence for _, reading in claim.readings)]
        for spec in specs:
            if not all(spec.get(key) is not None for key in ("experiment", "model", "seq_len", "micro_batch")):
                continue
            names = [spec["experiment"]] if isinstance(spec["experiment"], str) else spec["experiment"]
            found += [(name, spec["model"], int(spec["seq_len"]), int(spec["micro_batch"])) for name in names]
    return list(dict.fromkeys(found))
