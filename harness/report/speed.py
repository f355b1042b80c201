"""Predicted against measured speed: every ok GPU run beside the speed the lab predicted for it.

The predictions are `harness predict --speed-of-runs` (results/predictions/speed/<device>/<record file>):
the run's own configuration simulated on fake tensors, its kernels costed on the run's card
(harness.predict.speed). Measured: the run's tokens per step over the median of its timed steps; its
spread is the range of tokens/s its fastest and slowest timed steps give. The target: within
SPEED_TOLERANCE for at least TARGET_SHARE of the runs with at least LARGE_STEP_TOKENS tokens per step;
smaller steps (launch-bound) are shown with their error too. Reads JSON only.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.report.load import LAB_ENGINE, _get
from harness.report.tables import Cell, Table
from harness.report.units import model_name

SPEED_TOLERANCE = 0.15
TARGET_SHARE = 0.80
LARGE_STEP_TOKENS = 2048


@dataclass
class SpeedRow:
    file: str
    experiment: str
    model: str
    engine: str | None
    shape: str
    tokens_per_step: int
    measured: float             # tokens/s at the median step time
    slowest: float | None       # tokens/s of the slowest timed step
    fastest: float | None       # tokens/s of the fastest timed step
    spread: float | None        # stdev / median of the step times
    predicted: float | None
    method: str | None          # kernels | analytic
    bound: str | None           # host | device | host link (kernels only)
    note: str = ""

    @property
    def error(self) -> float | None:
        return None if self.predicted is None else self.predicted / self.measured - 1

    @property
    def within_spread(self) -> bool | None:
        if self.predicted is None or self.slowest is None:
            return None
        return self.slowest <= self.predicted <= self.fastest


def speed_rows(results) -> list[SpeedRow]:
    rows = []
    for record in sorted(results.records + results.engine_records, key=lambda r: r.get("_file") or ""):
        throughput = record.get("throughput") or {}
        if record.get("status") != "ok" or _get(record, "memory", "source") != "cuda" or not throughput.get(
                "tokens_per_s"):
            continue
        tokens = throughput.get("tokens_per_step")
        times = throughput.get("step_time_s") or {}
        config = record.get("config") or {}
        speed = (results.speed_predictions.get(record["_file"]) or {}).get("speed") or {}
        rows.append(SpeedRow(
            record["_file"], str(record.get("experiment")), str(config.get("model")), config.get("engine"),
            f"{config.get('seq_len')} x {config.get('micro_batch')} x {config.get('grad_accum')}", tokens,
            throughput["tokens_per_s"],
            tokens / times["max"] if times.get("max") else None, tokens / times["min"] if times.get("min") else None,
            times["stdev"] / times["median"] if times.get("stdev") is not None and times.get("median") else None,
            speed.get("tokens_per_s"), speed.get("method"), speed.get("bound"),
            "; ".join(filter(None, (speed.get("note"), speed.get("why"))))))
    return rows


def speed_summary(rows: list[SpeedRow]) -> dict:
    """The share of predicted runs with >= LARGE_STEP_TOKENS tokens per step within SPEED_TOLERANCE, and of
    the smaller ones, by method."""
    def share(selected):
        predicted = [r for r in selected if r.error is not None]
        within = [r for r in predicted if abs(r.error) <= SPEED_TOLERANCE]
        return {"runs": len(selected), "predicted": len(predicted), "within": len(within),
                "share": len(within) / len(predicted) if predicted else None}

    large = [r for r in rows if (r.tokens_per_step or 0) >= LARGE_STEP_TOKENS]
    small = [r for r in rows if (r.tokens_per_step or 0) < LARGE_STEP_TOKENS]
    summary = {"large": share(large), "large_kernels": share([r for r in large if r.method == "kernels"]),
               "small": share(small)}
    summary["target_met"] = (summary["large"]["share"] is not None
                             and summary["large"]["predicted"] == summary["large"]["runs"]
                             and summary["large"]["share"] >= TARGET_SHARE)
    return summary


def speed_text(rows: list[SpeedRow]) -> str:
    summary = speed_summary(rows)
    large, small = summary["large"], summary["small"]

    def part(found, what):
        if not found["predicted"]:
            return f"no {what} run has a speed prediction"
        return (f"{found['within']} of {found['predicted']} {what} runs within {SPEED_TOLERANCE:.0%} "
                f"({found['share']:.0%}" + (f"; {found['runs'] - found['predicted']} without a prediction)"
                                             if found["runs"] > found["predicted"] else ")"))

    return (f"Speed predicted from each run's own kernels (the runner's step under fake tensors; each kernel "
            f"costed by its FLOPs against the lab's measured matmul throughput or by its bytes against measured "
            f"bandwidth, with a host launch cost per kernel from the lab's micro-benchmarks; Liger's fused kernels as "
            f"the simulation's stand-ins record them; activation offloading's copies on their own stream at the "
            f"card's PCIe rate), against the tokens/s "
            f"the run measured: {part(large, f'>= {LARGE_STEP_TOKENS:,}-token')} (target: "
            f"{TARGET_SHARE:.0%}: {'met' if summary['target_met'] else 'not met'}); "
            f"{part(small, 'smaller')}. No constant is fitted to these runs.")


def speed_table(rows: list[SpeedRow]) -> Table:
    body = []
    for r in rows:
        error = r.error
        css = "" if error is None else ("holds" if abs(error) <= SPEED_TOLERANCE else "off")
        spread = ("" if r.slowest is None else f"{r.slowest:,.0f}-{r.fastest:,.0f}"
                  + (f" (sd {r.spread:.0%})" if r.spread is not None else ""))
        body.append([
            Cell(r.experiment, f"{model_name(r.model)}, {r.shape}"
                 + (f", {r.engine}" if r.engine and r.engine != LAB_ENGINE else "")),
            Cell(f"{r.tokens_per_step:,}" if r.tokens_per_step else ""),
            Cell(f"{r.measured:,.0f}", spread),
            Cell("" if r.predicted is None else f"{r.predicted:,.0f}",
                 " ".join(filter(None, (r.method, f"{r.bound}-bound" if r.bound else "", r.note)))),
            Cell("" if error is None else f"{error:+.0%}",
                 "" if r.within_spread is None else ("inside the spread" if r.within_spread else ""), css=css),
        ])
    note = (f"Measured: tokens per step over the median timed step; beneath, the tokens/s of the slowest and "
            f"fastest timed steps and the step times' standard deviation over their median. Predicted: "
            f"`harness predict --speed-of-runs` (kernels: the simulated step's own kernels; analytic: matmul FLOPs "
            f"only, where the step cannot be simulated, a bound). Error: predicted over measured, minus one; shaded "
            f"within {SPEED_TOLERANCE:.0%}.")
    return Table(["Run", "Tokens/step", "Measured tokens/s", "Predicted tokens/s", "Error"], body, note,
                 css="speed", numeric={1, 2, 3, 4})
