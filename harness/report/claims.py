"""The claims the ledger checks, read from claims.yaml (the documents' figures, in the project's words)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
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
    # Another fair reading of the same words, judged and shown beside the verdict (which is the
    # claim's own reading): (label, the claim as that reading has it).
    readings: tuple[tuple[str, "Claim"], ...] = ()

    @property
    def tolerance_text(self) -> str:
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


def parse_claim(entry: dict) -> Claim:
    """One claims.yaml entry; a reading overrides the claim's figure, comparison and evidence."""
    figure = entry["figure"]
    if entry["compare"] not in COMPARISONS:
        raise ValueError(f"claim {entry['id']}: compare must be one of {COMPARISONS}, not {entry['compare']!r}")
    unknown = set(entry["sources"]) - set(SOURCES)
    if unknown:
        raise ValueError(f"claim {entry['id']}: unknown source(s) {sorted(unknown)}")
    return Claim(
        id=entry["id"], sources=tuple(entry["sources"]), claim=entry["claim"],
        figure_value=None if figure.get("value") is None else float(figure["value"]),
        unit=figure["unit"], figure_text=figure["text"], model=entry["model"], compare=entry["compare"],
        tolerance=float(entry["tolerance"]), evidence=dict(entry["evidence"]), needs=entry["needs"],
        caveat_tolerance=None if entry.get("caveat_tolerance") is None else float(entry["caveat_tolerance"]),
        caveat=entry.get("caveat"), explain=entry.get("explain"), cpu_ok=bool(entry.get("cpu_ok", False)),
        context=tuple(entry.get("context") or ()), published=entry.get("published"),
        quote=entry.get("quote"), premise=entry.get("premise"),
        readings=tuple((reading["label"], parse_claim({**_own_fields(entry), **reading}))
                       for reading in entry.get("readings") or ()),
    )


def _own_fields(entry: dict) -> dict:
    """What a reading inherits from its claim: identity and wording, not the claim's evidence extras."""
    return {key: entry[key] for key in ("id", "sources", "claim", "model", "needs") if key in entry}


def load_claims(path: Path = CLAIMS_FILE) -> list[Claim]:
    data = yaml.safe_load(Path(path).read_text())
    claims = [parse_claim(entry) for entry in data["claims"]]
    ids = [c.id for c in claims]
    if len(ids) != len(set(ids)):
        raise ValueError("claims.yaml: duplicate claim IDs")
    return claims
