"""The report's figures (seaborn on matplotlib's Agg backend), each with a caption naming its device.

Every function returns a FigureResult; when its inputs are absent the result carries no image
but a sentence saying what is missing and which command produces it. PNGs are written without
metadata, so the same inputs give the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from harness.claims import Claim  # noqa: E402
from harness.cards import card_bytes  # noqa: E402
from harness.measure.budget import budget_cap_bytes  # noqa: E402
from harness.report.load import CATEGORIES, Results, machine  # noqa: E402
from harness.report.loss import comparison_key, eval_final, loss_parity  # noqa: E402
from harness.report.units import CATEGORY_WORDS, DOCUMENTS_MODEL, card_of, model_name  # noqa: E402
from harness.schema import SHARDING_BUFFERS  # noqa: E402
from harness.techniques import TECHNIQUES  # noqa: E402

CARDS_GB = (16, 24, 40, 80)
TECHNIQUE_ORDER = ("fp32", "bf16-mixed", "bf16-mixed-gc", "fp16-mixed", "bf16-pure", "adamw8bit", "lora",
                   "lora-ga4", "int8-lora", "qlora", "qlora-gc")
CATEGORY_COLORS = dict(zip(CATEGORIES, sns.color_palette("Set2", len(CATEGORIES))))
DPI = 96
STYLE = {"font.family": "DejaVu Sans", "figure.max_open_warning": 0}


@dataclass(frozen=True)
class FigureResult:
    name: str       # file stem under reports/figures/
    title: str
    caption: str
    png: bytes | None = None
    missing: str = ""  # why there is no image, and which command produces the inputs


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _technique_key(name: str) -> tuple:
    return (TECHNIQUE_ORDER.index(name) if name in TECHNIQUE_ORDER else len(TECHNIQUE_ORDER), name)


def _panel_grid(count: int, max_columns: int, panel_size: tuple[float, float]):
    """A figure with `count` panels, at most `max_columns` to a row (axes as a 2-D array)."""
    columns = min(max_columns, count)
    rows = -(-count // columns)
    return plt.subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows), squeeze=False)


def _experiment_palette(frame: pd.DataFrame) -> tuple[list[str], dict]:
    """The frame's experiments in technique order, and one colour each (the same in every panel)."""
    experiments = sorted(frame["experiment"].unique(), key=_technique_key)
    return experiments, dict(zip(experiments, sns.color_palette("tab20", len(experiments))))


def _spread_labels(ax, texts, obstacles=()):
    """Annotations (offset in points from their point) moved so that none sits on another or on a point:
    each tries its point's right, then its left, a line lower or higher each time, and takes the first
    place inside the panel that is free; where none is, the first free place outside it. Call it once the
    figure's layout is final: the boxes are measured in pixels."""
    renderer = ax.figure.canvas.get_renderer()
    panel = ax.get_window_extent(renderer)
    to_points = 72 / ax.figure.dpi
    taken = list(obstacles)
    for text in sorted(texts, key=lambda t: -ax.transData.transform(t.xy)[1]):  # the highest point first
        text.set_verticalalignment("bottom")
        line = text.get_window_extent(renderer).height * to_points
        chosen = None
        for step in (0, -1, 1, -2, 2, -3, 3):
            for align, dx in (("left", 3), ("right", -3)):  # left-aligned text sits right of its point
                text.set_horizontalalignment(align)
                text.xyann = (dx, (2 if step >= 0 else -2) + step * line)
                box = text.get_window_extent(renderer)
                if any(box.overlaps(other) for other in taken):
                    continue
                if panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1:
                    chosen = (align, text.xyann)
                    break
                chosen = chosen or (align, text.xyann)
            else:
                continue
            break
        if chosen:
            text.set_horizontalalignment(chosen[0])
            text.xyann = chosen[1]
        taken.append(text.get_window_extent(renderer))


def _point_boxes(ax, xs, ys, radius_px: float = 4.0) -> list:
    """The pixel boxes of scatter points, for labels to keep off."""
    points = ax.transData.transform(np.column_stack([xs, ys]))
    return [matplotlib.transforms.Bbox([[x - radius_px, y - radius_px], [x + radius_px, y + radius_px]])
            for x, y in points]


def _gpu_label(row) -> str:
    return str(row["device_name"]) if row["device_type"] == "cuda" else "CPU (tracked bytes)"


def representative_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """One finished run per (model, experiment, device): unbudgeted, the model's usual shape, k = 1 first."""
    done = runs[(runs["status"] == "ok") & runs["peak_allocated"].notna()].copy()
    if done.empty:
        return done
    done["device"] = done.apply(_gpu_label, axis=1)
    usual_seq = done.groupby("model")["seq_len"].agg(lambda s: s.mode().iloc[0])
    done["unusual_seq"] = done["seq_len"] != done["model"].map(usual_seq)
    done["budgeted"] = done["budget_gb"].notna()
    done = done.sort_values(["budgeted", "unusual_seq", "grad_accum", "file"], kind="stable")
    return done.drop_duplicates(["model", "experiment", "device"]).reset_index(drop=True)


# --- 1. memory breakdown ------------------------------------------------------------------------

def _claim_markers(claims: list[Claim]) -> list[dict]:
    """The documents' totals to draw beside the bars: claims about a whole step or a sum of states."""
    markers = []
    for claim in claims:
        spec = claim.evidence
        if spec.get("quantity") not in ("peak", "min_peak", "categories_sum") or claim.figure_value is None:
            continue
        names = [spec["experiment"]] if isinstance(spec.get("experiment"), str) else list(spec.get("experiment") or [])
        markers.append({"model": spec.get("model"), "experiments": names, "value": claim.figure_value,
                        "label": f"{claim.id}: {claim.figure_text}", "line": claim.compare in ("fits", "at_least", "does_not_fit")})
    return markers


def _tick_style(count: int) -> tuple[float, int]:
    """The font size and turn of a panel's technique names: names side by side overlap once a panel is
    crowded, so they turn further, then stand upright and smaller."""
    if count > 30:
        return 7.5, 90
    return (8, 50) if count > 12 else (9, 25)


def _unsharded_buffers_zero(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs on one rank with their sharding buffers at zero where the record leaves them out: records
    written before those categories existed say nothing of them, and an unsharded run has none
    (harness.schema). Without this every older run counts as incomplete and its shape loses its bars."""
    runs = runs.copy()
    if runs.empty:
        return runs
    single = runs["world_size"].fillna(1) <= 1
    for buffer in SHARDING_BUFFERS:
        runs.loc[single, f"peak_{buffer}"] = runs.loc[single, f"peak_{buffer}"].fillna(0)
    return runs


def _claim_labels(ax, labelled: list[tuple[float, str]], fontsize: float = 8) -> None:
    """The claims' labels in the panel's right margin, each at its marker's height (GB), pushed apart by
    a line where two would meet: inside the panel a label sits on the bars."""
    bottom, top = ax.get_ylim()
    renderer = ax.figure.canvas.get_renderer()
    # one line of text as a fraction of the panel's height, measured once the layout is final
    gap = fontsize * 1.25 * ax.figure.dpi / 72 / ax.get_window_extent(renderer).height
    previous = -np.inf
    for value, text in sorted(labelled):
        at = (value - bottom) / (top - bottom)
        y = max(at, previous + gap)
        previous = y
        ax.annotate(text, xy=(1.0, at), xycoords="axes fraction", xytext=(1.008, y), textcoords="axes fraction",
                    va="center", ha="left", fontsize=fontsize, annotation_clip=False,
                    arrowprops=None if y == at else {"arrowstyle": "-", "linewidth": 0.5, "color": "grey"})


def measured_breakdowns(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished GPU runs with every category at the peak, one per (model, experiment, device, shape):
    unbudgeted and k = 1 first. A shape's runs are all kept (not only each model's usual shape), so a panel
    at any shape shows every technique measured there."""
    done = runs[(runs["status"] == "ok") & runs["peak_allocated"].notna() & (runs["device_type"] == "cuda")]
    done = _unsharded_buffers_zero(done)
    done = done[done[[f"peak_{c}" for c in CATEGORIES]].notna().all(axis=1)].copy()
    if done.empty:
        return done.assign(device=[], shape=[])
    done["device"] = done.apply(_gpu_label, axis=1)
    done["shape"] = [(int(seq), int(batch)) for seq, batch in zip(done["seq_len"], done["micro_batch"])]
    done = done.assign(budgeted=done["budget_gb"].notna()).sort_values(["budgeted", "grad_accum", "file"],
                                                                        kind="stable")
    return done.drop_duplicates(["model", "experiment", "device", "shape"]).reset_index(drop=True)


def breakdown_shapes(measured: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """Each measured model's panel shape, (sequence, micro-batch): the one with the most measured techniques
    (ties: the smaller shape), so that most of its bars are measurements rather than predictions."""
    techniques: dict[str, dict[tuple[int, int], set]] = {}
    for model, shape, experiment in zip(measured["model"], measured["shape"], measured["experiment"]):
        techniques.setdefault(model, {}).setdefault(shape, set()).add(experiment)
    return {model: min(found, key=lambda shape: (-len(found[shape]), shape)) for model, found in techniques.items()}


def memory_breakdown(results: Results, runs: pd.DataFrame, predictions: pd.DataFrame,
                     claims: list[Claim]) -> FigureResult:
    name, title = "memory-breakdown", "Memory at the peak, by category"
    bars = []
    measured = measured_breakdowns(runs)
    shapes = breakdown_shapes(measured)
    for _, r in measured.iterrows():
        if shapes[r["model"]] != r["shape"]:
            continue
        bars.append({"model": r["model"], "experiment": r["experiment"], "source": f"measured: {r['device']}",
                     "shape": f"seq {r['shape'][0]} x {r['shape'][1]}", **{c: r[f"peak_{c}"] for c in CATEGORIES}})
    cuda = predictions[(predictions["device_type"] == "cuda") & predictions["total_bytes"].notna()]
    for model, of_model in cuda.sort_values(["seq_len", "micro_batch"]).groupby("model", sort=False):
        shape = shapes.get(model, (of_model["seq_len"].iloc[0], of_model["micro_batch"].iloc[0]))
        chosen = of_model[(of_model["seq_len"] == shape[0]) & (of_model["micro_batch"] == shape[1])]
        for _, p in chosen.sort_values(["experiment", "method", "file"]).iterrows():
            bars.append({"model": p["model"], "experiment": p["experiment"], "source": p["method"],
                         "shape": f"seq {p['seq_len']} x {p['micro_batch']}",
                         **{c: 0 if pd.isna(p[f"peak_{c}"]) else p[f"peak_{c}"] for c in CATEGORIES}})
    if not bars:
        return FigureResult(name, title, "", missing=(
            f"No GPU run records or CUDA predictions in {results.root}: `make bench` on a GPU writes run records "
            "and `python -m harness predict --claims` writes predictions."))
    frame = pd.DataFrame(bars)
    models = sorted(frame["model"].unique(), key=lambda m: (m != DOCUMENTS_MODEL, m))  # the documents' 7B first
    sources = sorted(frame["source"].unique(), key=lambda s: ({"analytic": 0, "simulated": 1}.get(s, 2), s))
    markers = _claim_markers(claims)
    counts = [frame.loc[frame["model"] == model, "experiment"].nunique() for model in models]
    # a panel's height is its bars' and its names' (the longest name, turned): a panel of a few short names
    # takes less room than one of fifty long ones, and every name keeps the slot it needs across
    names = [max(len(e) for e in frame.loc[frame["model"] == model, "experiment"].unique()) for model in models]
    heights = [2.1 + _tick_style(count)[0] / 72 * 0.6 * longest * np.sin(np.radians(_tick_style(count)[1])) + 0.4
               for count, longest in zip(counts, names)]
    fig, axes = plt.subplots(len(models), 1, figsize=(max(12, 0.22 * max(counts)), sum(heights) + 0.6),
                             squeeze=False, layout="constrained")
    hatches = ["", "//", "..", "xx", "\\\\"]
    labelled: dict[str, list[tuple[float, str]]] = {}
    for ax, model in zip(axes[:, 0], models):
        part = frame[frame["model"] == model]
        experiments = sorted(part["experiment"].unique(), key=_technique_key)
        here = [s for s in sources if s in set(part["source"])]
        width = min(0.8 / len(here), 0.3)
        for slot, source in enumerate(here):
            rows = part[part["source"] == source].drop_duplicates("experiment").set_index("experiment")
            offset = width * (slot - (len(here) - 1) / 2)
            x = np.array([experiments.index(e) for e in rows.index]) + offset
            bottom = np.zeros(len(rows))
            for category in CATEGORIES:
                values = rows[category].to_numpy(dtype=float) / 1e9
                ax.bar(x, values, width * 0.92, bottom=bottom, color=CATEGORY_COLORS[category],
                       hatch=hatches[sources.index(source) % len(hatches)], edgecolor="white", linewidth=0.4)
                bottom += values
        ax.grid(axis="x", visible=False)
        tops = [part[list(CATEGORIES)].sum(axis=1).max()] + [m["value"] for m in markers if m["model"] == model]
        ax.set_ylim(0, max(tops) / 1e9 * 1.12)
        labelled[model] = []  # (GB, text): written in the margin once the layout is final
        for marker in markers:
            if marker["model"] != model:
                continue
            if marker["line"]:
                ax.axhline(marker["value"] / 1e9, color="black", linestyle="--", linewidth=1)
                labelled[model].append((marker["value"] / 1e9, f"- - {marker['label']}"))
                continue
            drawn = [experiment for experiment in marker["experiments"] if experiment in experiments]
            for experiment in drawn:
                ax.plot(experiments.index(experiment), marker["value"] / 1e9, marker="D", color="black",
                        markersize=6, zorder=5)
            if drawn:
                labelled[model].append((marker["value"] / 1e9, f"\u25c6 {marker['label']}, at {', '.join(drawn)}"))
        shapes = ", ".join(sorted(part["shape"].unique()))
        ax.set_title(f"{model_name(model)} ({shapes})", fontsize=10, loc="left")
        fontsize, rotation = _tick_style(len(experiments))
        upright = rotation == 90
        ax.set_xticks(range(len(experiments)), experiments, fontsize=fontsize, rotation=rotation,
                      ha="center" if upright else "right", rotation_mode="default" if upright else "anchor")
        ax.set_ylabel("GB (1e9 bytes)")
        ax.set_xlim(-0.6, len(experiments) - 0.4)
    handles = [plt.Rectangle((0, 0), 1, 1, color=CATEGORY_COLORS[c]) for c in CATEGORIES]
    handles += [plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="grey", hatch=hatches[i % len(hatches)])
                for i in range(len(sources))]
    handles += [plt.Line2D([], [], marker="D", color="black", linestyle=""),
                plt.Line2D([], [], color="black", linestyle="--", linewidth=1)]
    labels = ([CATEGORY_WORDS[c] for c in CATEGORIES] + [f"bars: {s}" for s in sources]
              + ["the documents' figure for a run", "the documents' bound (fits, at least)"])
    fig.legend(handles, labels, loc="outside upper center", ncol=5, fontsize=8)
    # the claims' labels go beside the panels rather than on the bars, placed once the layout has been made
    # (the layout is made again on saving, with room for them)
    fig.draw_without_rendering()
    for ax, model in zip(axes[:, 0], models):
        _claim_labels(ax, labelled[model])
    devices = sorted({s.split(": ", 1)[1] for s in sources if s.startswith("measured: ")})
    caption = ("What is alive at the peak of one training step, stacked by category, per technique and model. "
               "Analytic and simulated bars are predictions of the CUDA code path (no GPU used); "
               + (f"measured bars: {', '.join(devices)}. " if devices else "no measured bars. ")
               + "Each panel is at one shape: the one with the most measured GPU runs (ties: the smaller), so "
               "most bars are measured, else the smallest predicted. Black diamonds and dashed lines are the "
               "documents' figures, named by claim ID in the margin. GB = 1e9 bytes.")
    return FigureResult(name, title, caption, _png(fig))


# --- 2. throughput vs memory ------------------------------------------------------------------

def _pareto(points: pd.DataFrame) -> pd.DataFrame:
    """Runs no other run beats on both peak memory (lower) and throughput (higher)."""
    ordered = points.sort_values(["peak_gb", "tokens_per_s"], ascending=[True, False])
    front, best = [], -np.inf
    for _, row in ordered.iterrows():
        if row["tokens_per_s"] > best:
            front.append(row)
            best = row["tokens_per_s"]
    return pd.DataFrame(front)


def _shape_words(run) -> str:
    """A run's shape as the caption says it: sequence x micro-batch, and its accumulation where more than 1."""
    accumulated = int(run["grad_accum"]) if pd.notna(run["grad_accum"]) else 1
    return (f"{int(run['seq_len']):,} x {int(run['micro_batch'])}"
            + (f", {accumulated} accumulated" if accumulated > 1 else ""))


def throughput_vs_memory(runs: pd.DataFrame) -> FigureResult:
    name, title = "throughput-vs-memory", "Throughput against peak memory"
    done = representative_runs(runs)  # one run per technique at each model's usual shape
    if len(done):  # a time means something only on a GPU; CPU runs are in the appendix's table
        done = done[(done["device_type"] == "cuda") & done["tokens_per_s"].notna()].copy()
    if done.empty:
        return FigureResult(name, title, "", missing=(
            "No finished GPU runs with throughput: `make bench` on a GPU produces them."))
    # like with like: a panel's runs share model, device, sequence, micro-batch and accumulation (k micro-batches
    # a step does k times the tokens of one; its tokens/s and peak sit apart from k = 1's)
    accumulated = done["grad_accum"].fillna(1).astype(int)
    done["panel"] = (done["model"] + " | " + done["device"] + ", seq " + done["seq_len"].astype(int).astype(str)
                     + " x " + done["micro_batch"].astype(int).astype(str)
                     + np.where(accumulated > 1, ", " + accumulated.astype(str) + " accumulated", ""))
    done["peak_gb"] = done["peak_allocated"] / 1e9
    # a panel of one run compares nothing: those runs are named in the caption instead
    counts = done.groupby("panel")["experiment"].nunique()
    alone = done[done["panel"].isin(counts[counts < 2].index)]
    if len(alone) < len(done):
        done = done[~done["panel"].isin(alone["panel"])]
    else:
        alone = alone.iloc[0:0]
    panels = sorted(done["panel"].unique(), key=lambda p: (not p.startswith(DOCUMENTS_MODEL + " "), p))
    fig, axes = _panel_grid(len(panels), 3, (4.6, 3.6))
    experiments, palette = _experiment_palette(done)
    labels = {}  # panel: its runs' labels, moved off each other once the layout is final
    for ax, panel in zip(axes.flat, panels):
        part = done[done["panel"] == panel]
        sns.scatterplot(data=part, x="peak_gb", y="tokens_per_s", hue="experiment", palette=palette,
                        hue_order=[e for e in experiments if e in set(part["experiment"])], s=60, ax=ax,
                        legend=False)
        front = _pareto(part)
        ax.plot(front["peak_gb"], front["tokens_per_s"], color="grey", linestyle=":", linewidth=1)
        labels[panel] = [ax.annotate(row["experiment"], (row["peak_gb"], row["tokens_per_s"]), fontsize=7,
                                     xytext=(3, 3), textcoords="offset points") for _, row in part.iterrows()]
        model, device = panel.split(" | ", 1)
        ax.set_title(f"{model_name(model)}\n{device}", fontsize=9)
        ax.set_xlabel("peak GB (1e9 bytes), allocated")
        ax.set_ylabel("tokens/s")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    for ax, panel in zip(axes.flat, panels):
        part = done[done["panel"] == panel]
        _spread_labels(ax, labels[panel], _point_boxes(ax, part["peak_gb"], part["tokens_per_s"]))
    devices = sorted(done["device"].unique())
    caption = ("Each technique's tokens per second (median step) against its peak memory on a GPU, one run per "
               "technique at each model's usual shape; a panel's runs share model, device, sequence length, "
               "micro-batch and gradient accumulation (named in the title where more than 1). The dotted line "
               "joins the runs no other run beats on both. Devices: " + ", ".join(devices) + "."
               + ("" if alone.empty else " Alone at their shape (sequence, micro-batch, accumulation), so not "
                  "drawn: " + "; ".join(
                   f"{r['experiment']} @ {model_name(r['model'])}, {_shape_words(r)}, {r['tokens_per_s']:,.0f} "
                   f"tokens/s at {r['peak_gb']:.1f} GB" for _, r in alone.iterrows()) + "."))
    return FigureResult(name, title, caption, _png(fig))


# --- 3. loss curves -----------------------------------------------------------------------------

def loss_panels(results: Results) -> dict[tuple, tuple[dict[str, dict], set[str]]]:
    """The loss table's comparisons by comparison (one base, data, steps and shape): {comparison key:
    ({experiment: its record}, the experiments others are judged against)}, each compared run with the
    reference it is judged against (harness.report.loss), shown or folded."""
    panels: dict[tuple, tuple[dict[str, dict], set[str]]] = {}
    for comparison in loss_parity(results.records, results.folded_records):
        runs, references = panels.setdefault(comparison_key(comparison.record), ({}, set()))
        runs.setdefault(comparison.record["experiment"], comparison.record)
        if comparison.reference is not None:
            runs.setdefault(comparison.reference["experiment"], comparison.reference)
            references.add(comparison.reference["experiment"])
    return panels


def final_losses(results: Results) -> FigureResult:
    """The loss table drawn: a panel per comparison (loss_panels), each run's final held-out loss."""
    name, title = "loss-curves", "Final loss from pretrained weights, per technique on the same data"
    panels = loss_panels(results)
    if not panels:
        return FigureResult(name, title, "", missing=(
            "No finished fine-tune from pretrained weights with a held-out loss: `make base`, then `make bench`."))
    most = max(len(runs) for runs, _ in panels.values())
    fig, axes = _panel_grid(len(panels), 2, (6.5, 1.2 + 0.3 * most))
    devices = set()
    for ax, (runs, references) in zip(axes.flat, panels.values()):
        ordered = sorted(runs.items(), key=lambda item: eval_final(item[1]))
        losses = [eval_final(record) for _, record in ordered]
        judged_against = [experiment in references for experiment, _ in ordered]
        ax.scatter(losses, range(len(ordered)), s=40, zorder=3,
                   c=["black" if reference else "#0969da" for reference in judged_against])
        ax.set_yticks(range(len(ordered)), [f"{experiment} (reference)" if reference else experiment
                                            for (experiment, _), reference in zip(ordered, judged_against)],
                      fontsize=8)
        ax.invert_yaxis()
        # at least 1% of the loss across: the tolerances are 1% to 5%, and a difference of 1e-5 drawn
        # across the whole panel would look like one
        middle, half = (min(losses) + max(losses)) / 2, max(max(losses) - min(losses), 0.01 * max(losses)) * 0.55
        ax.set_xlim(middle - half, middle + half)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlabel("final held-out loss (nats)")
        config = ordered[0][1].get("config") or {}
        accumulated = f", {config.get('grad_accum')} accumulated" if (config.get("grad_accum") or 1) > 1 else ""
        ax.set_title(f"{config.get('base_checkpoint') or ordered[0][1].get('model')}\n{config.get('steps')} steps of "
                     f"{config.get('micro_batch')} x {config.get('seq_len')} tokens{accumulated}", fontsize=9)
        ax.grid(axis="x", color="#d0d7de", linewidth=0.5)
        devices |= {str(machine(record)[0]) for _, record in ordered}
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    caption = ("Each technique's held-out loss at the end of its fine-tune from pretrained weights, one panel per "
               "comparison of the loss section's table: the same base (its recipe @ its weights: a recipe "
               "pretrained on another processor is another base), sequences, steps and batch. Blue: a technique; "
               "black: a run the others of its panel are judged against (fp32, bf16-pure or LoRA, as the table "
               "says), kept even where a newer run of its configuration on another base is the one the other "
               "tables show. Runs from random weights are left out (they measure memory and speed, and their "
               "loss says nothing). Devices: " + "; ".join(sorted(devices)) + ".")
    return FigureResult(name, title, caption, _png(fig))


# --- 4. predicted vs measured -------------------------------------------------------------------

def parity(runs: pd.DataFrame, predictions: pd.DataFrame) -> FigureResult:
    name, title = "predicted-vs-measured", "Predicted against measured peak: the error of each run"
    missing = ("No prediction matches a measured run's configuration (experiment, model, sequence length, "
               "micro-batch, accumulation, device type). `python -m harness predict --experiment E --model M "
               "--seq S --batch B --save` predicts a run's configuration; `make bench` measures it.")
    done = runs[(runs["status"] == "ok") & runs["peak_allocated"].notna()]
    if done.empty or predictions.empty:
        return FigureResult(name, title, "", missing=missing)
    keys = ["experiment", "model", "seq_len", "micro_batch", "grad_accum", "world_size", "device_type"]
    left = done[keys + ["peak_allocated", "device_name"]].copy()
    right = predictions[keys + ["method", "total_bytes"]].copy()
    for key in ("seq_len", "micro_batch", "grad_accum", "world_size"):
        left[key] = left[key].astype("Int64")
        right[key] = right[key].astype("Int64")
    matched = left.merge(right, on=keys).dropna(subset=["total_bytes"])
    if matched.empty:
        return FigureResult(name, title, "", missing=missing)
    matched = matched.drop_duplicates(keys + ["method"]).sort_values(keys + ["method"])
    matched["error_pct"] = (matched["total_bytes"] / matched["peak_allocated"] - 1) * 100
    matched["evidence"] = np.where(matched["device_type"] == "cuda", "GPU (allocator)", "CPU (tracked bytes)")
    matched["run"] = [f"{r.experiment} @ {model_name(r.model)}, {r.seq_len} x {r.micro_batch}"
                      + (f" x {r.grad_accum}" if r.grad_accum and r.grad_accum > 1 else "")
                      + (f", {r.world_size} ranks" if r.world_size and r.world_size > 1 else "")
                      + ("" if r.device_type == "cuda" else " (CPU)") for r in matched.itertuples()]
    order = list(dict.fromkeys(matched.sort_values(["device_type", "model", "experiment"], ascending=[False, True, True])
                               ["run"]))
    # one row per run, its error read off a shared axis: no label sits on another
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.24 * len(order)))
    ax.axvspan(-3, 3, color="grey", alpha=0.25, label="±3%")
    ax.axvline(0, color="black", linewidth=0.8)
    sns.stripplot(data=matched, x="error_pct", y="run", hue="method", order=order,
                  hue_order=sorted(matched["method"].unique()), size=7, jitter=False, dodge=False, ax=ax)
    ax.set_xlabel("prediction error, % of the measured peak ((predicted - measured) / measured)")
    ax.set_ylabel("")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", color="#d0d7de", linewidth=0.5)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    within = (matched["error_pct"].abs() <= 3).sum()
    devices = sorted(matched["device_name"].unique())
    caption = (f"Each row is one measured run (experiment @ model, sequence x micro-batch), each point the error of "
               f"a prediction of the same configuration against it; {within} of {len(matched)} predictions fall "
               f"inside the ±3% band. Devices: {', '.join(devices)}. GPU rows compare with torch's peak allocated "
               "from the run's record (results/<device>/); rows marked (CPU) with tracked tensor bytes (a prediction "
               "of the CPU code path, not a GPU check). Predictions: `python -m harness predict --claims`; "
               "measurements: `make bench`.")
    return FigureResult(name, title, caption, _png(fig))


# --- 5. fits in budget ----------------------------------------------------------------------------

FIT_CODES = {"fits (measured)": 2, "fits (predicted)": 1, "OOM (predicted)": -1, "OOM (measured)": -2}


def _card_gb(card: float) -> float:
    """A card's nominal size from its bytes (harness.cards' convention), else its GiB."""
    size = card_of(card)
    return float(size) if size is not None else card / 2**30


FIT_SHAPE = (512, 1)  # the predicted cells' sequence length and micro-batch
NOT_PREDICTED = f"not\npredicted\nat {FIT_SHAPE[0]} x {FIT_SHAPE[1]}"


def _mark_unpredicted(ax, codes: pd.DataFrame) -> None:
    """Grey, hatched cells where the grid has nothing: a technique drawn for its measured cell alone (a
    run under a budget at its own shape) has no prediction at FIT_SHAPE for the other cards, and a blank
    cell would read as a missing figure rather than one never made. (seaborn writes no text in an empty
    cell, so the words are written here.)"""
    ax.grid(False)
    for row, column in zip(*np.where(codes.isna().to_numpy())):
        ax.add_patch(plt.Rectangle((column, row), 1, 1, facecolor="#eaeef2", edgecolor="#afb8c1", hatch="///",
                                   linewidth=0, zorder=0))
        ax.text(column + 0.5, row + 0.5, NOT_PREDICTED, ha="center", va="center", fontsize=6.5, color="#57606a",
                bbox={"facecolor": "#eaeef2", "edgecolor": "none", "pad": 1})


def _fit_answers(fit_rows: list[dict] | None) -> dict[tuple[str, str, float], tuple[bool, int, str]]:
    """{(model, experiment, card): (fits, tensor peak, the peak's method)} from the fit table: a step fits a card at
    FIT_SHAPE where its longest sequence at micro-batch 1 reaches FIT_SHAPE's (the table's answer, confirmed by
    simulation where it says so, for the pretrained weights a fine-tune starts from); the peak is the table's
    tensor peak there, analytic."""
    return {(row["model"], f"{row['experiment']}-gc" if row["gradient_checkpointing"] else row["experiment"],
             float(row["card_gb"])): (row["max_seq_len"] >= FIT_SHAPE[0], row["reference_peak_bytes"], "analytic")
            for row in fit_rows or ()}


def fits_grid(runs: pd.DataFrame, predictions: pd.DataFrame, fit_rows: list[dict] | None = None) -> FigureResult:
    """Measured budget runs, and for each technique predicted at FIT_SHAPE the fit table's answer on each card where
    the table has the row (one answer with the tables'), else the prediction's device bytes against the card."""
    name, title = "fits-in-budget", "Which technique fits which card"
    answers = _fit_answers(fit_rows)
    gpu_budget = runs[(runs["device_type"] == "cuda") & runs["budget_gb"].notna() & runs["status"].isin(["ok", "oom"])]
    cells = []
    for _, run in gpu_budget.sort_values("status", key=lambda status: status != "ok", kind="stable").iterrows():
        fits = run["status"] == "ok"
        peak = f"\n{run['peak_allocated'] / 1e9:.1f} meas." if fits and pd.notna(run["peak_allocated"]) else "\nmeasured"
        if (run["seq_len"], run["micro_batch"]) != FIT_SHAPE:  # the predicted cells are at FIT_SHAPE: say when not
            peak += f"\n{int(run['seq_len']):,} x {int(run['micro_batch'])}"
        cells.append({"model": run["model"], "experiment": run["experiment"],
                      "card": _card_gb(run["budget_card_bytes"]),
                      "state": f"{'fits' if fits else 'OOM'} (measured)", "priority": 0,
                      "label": ("fits" if fits else "OOM") + peak})
    if not predictions.empty:
        chosen = predictions[(predictions["seq_len"] == FIT_SHAPE[0]) & (predictions["micro_batch"] == FIT_SHAPE[1])
                             & (predictions["device_type"] == "cuda") & predictions["total_bytes"].notna()]
        chosen = chosen.sort_values(["method"], ascending=False, kind="stable")  # simulated before analytic
        # the registry's techniques, plain and checkpointed: every other experiment has its own table
        # ("Every technique at 7B"), and forty rows in one panel cannot be read
        core = set(TECHNIQUES) | {f"{name}-gc" for name in TECHNIQUES}
        chosen = chosen[chosen["experiment"].isin(core)]
        for _, p in chosen.drop_duplicates(["model", "experiment"]).iterrows():
            for card in CARDS_GB:
                fits, peak, method = answers.get((p["model"], p["experiment"], float(card))) or (
                    # the predicted device bytes against the card (older predictions: tensor bytes against its cap)
                    p["device_bytes"] <= card_bytes(card) if pd.notna(p.get("device_bytes"))
                    else p["total_bytes"] <= budget_cap_bytes(card, "cuda"), p["total_bytes"], p["method"])
                cells.append({"model": p["model"], "experiment": p["experiment"], "card": float(card),
                              "state": f"{'fits' if fits else 'OOM'} (predicted)", "priority": 1,
                              "label": f"{'fits' if fits else 'OOM'}\n{peak / 1e9:.1f} {method[:3]}."})
    if not cells:
        return FigureResult(name, title, "", missing=(
            "No budget-emulated GPU runs and no predictions: `make bench BUDGET_GB=16` on a GPU measures, "
            "`python -m harness predict --claims` predicts."))
    frame = pd.DataFrame(cells).sort_values("priority", kind="stable").drop_duplicates(["model", "experiment", "card"])
    models = sorted(frame["model"].unique())
    most_rows = frame.groupby("model")["experiment"].nunique().max()
    # wide enough for the row labels to lie flat beside each panel
    fig, axes = plt.subplots(1, len(models), figsize=(3.5 * len(models) + 1, max(4.2, 0.32 * most_rows + 1.6)),
                             squeeze=False)
    colors = {2: "#1a9850", 1: "#a6d96a", -1: "#fdae61", -2: "#d73027"}
    cmap = matplotlib.colors.ListedColormap([colors[k] for k in sorted(colors)])
    norm = matplotlib.colors.BoundaryNorm([-2.5, -1.5, 0, 1.5, 2.5], cmap.N)
    unpredicted = 0  # cells with neither a measurement nor a prediction
    for ax, model in zip(axes[0], models):
        part = frame[frame["model"] == model]
        grid = part.pivot(index="experiment", columns="card", values="state")
        grid = grid.reindex(sorted(grid.index, key=_technique_key))
        codes = grid.apply(lambda col: col.map(FIT_CODES)).astype(float)
        labels = part.pivot(index="experiment", columns="card", values="label").reindex(index=grid.index,
                                                                                          columns=grid.columns)
        labels = labels.fillna("")
        sns.heatmap(codes, ax=ax, cmap=cmap, norm=norm, cbar=False, annot=labels.to_numpy(), fmt="",
                    # a fifth card (a budget run's own) narrows the cells: the words shrink to stay inside
                    annot_kws={"fontsize": 6.5 if len(grid.columns) <= len(CARDS_GB) else 6}, linewidths=0.5,
                    linecolor="white")
        _mark_unpredicted(ax, codes)
        unpredicted += int(codes.isna().to_numpy().sum())
        ax.set_title(model_name(model), fontsize=10)
        ax.set_xlabel("card, GB as sold (24: 24 GiB)")
        # a budget run's card of another convention (16e9 bytes, not 16 GiB) is said in GiB, not as a card sold
        ax.set_xticklabels([f"{c:g}" if c == int(c) else f"{c:.1f}\nGiB" for c in grid.columns])
        # seaborn turns tick labels upright when it finds them crowded; a technique's name is read across
        ax.tick_params(axis="y", labelrotation=0, labelsize=9)
        ax.tick_params(axis="x", labelrotation=0)
        ax.set_ylabel("")
    fig.tight_layout()
    measured = frame[frame["state"].str.endswith("(measured)")]
    caption = ("For each technique and card size: \"measured\" cells are runs under an emulated budget on a GPU "
               "(torch's allocator capped at the card less what lives outside it); \"predicted\" cells are the "
               f"fit table's answers at sequence {FIT_SHAPE[0]}, micro-batch {FIT_SHAPE[1]} (it fits where the longest "
               "sequence that fits reaches it, confirmed by simulation where the table says so, for the pretrained "
               "weights a fine-tune starts from), else the simulated (else analytic) device bytes against the card; "
               "cells give the tensors' peak in GB (sim. = simulated, ana. = analytic, meas. = measured), and a column "
               "in GiB is a budget run's card given in 1e9 bytes. "
               + (f"Grey hatched cells: no prediction at {FIT_SHAPE[0]} x {FIT_SHAPE[1]} (a technique shown for "
                  "its budget run at another shape). " if unpredicted else "")
               + (f"{len(measured)} measured cells." if len(measured) else "No measured cells: no budget-emulated "
                  "GPU run is recorded yet.") + " CPU budget runs are in the run table, not here.")
    return FigureResult(name, title, caption, _png(fig))


# --- 5b. peak against sequence length, with the cards ----------------------------------------------

SAME = " = "  # joins the names of techniques whose lines are one


def _merge_identical_series(curves: pd.DataFrame) -> pd.DataFrame:
    """Techniques predicted the same bytes at every point, renamed to one line and one legend entry
    ("bf16-mixed = fp16-mixed"): drawn apart, the later line hides the earlier, and the legend names a
    colour no one can find."""
    groups: dict[tuple, list[str]] = {}
    for experiment, rows in curves.groupby("experiment"):
        points = rows.sort_values(["checkpointing", "seq_len"])
        signature = tuple(zip(points["checkpointing"], points["seq_len"], (points["GiB"] * 2**30).round()))
        groups.setdefault(signature, []).append(experiment)
    names = {}
    for members in groups.values():
        members = sorted(members, key=_technique_key)
        names.update({member: SAME.join(members) for member in members})
    return curves.assign(experiment=curves["experiment"].map(names))


def memory_vs_sequence(results: Results) -> FigureResult:
    name, title = "memory-vs-sequence", "Peak memory against sequence length, with the cards"
    table = results.fits
    if not table or not table.get("curves"):
        return FigureResult(name, title, "", missing=(
            "No fit table: `python -m harness predict --claims` writes results/fits/."))
    curves = pd.DataFrame(table["curves"])
    # the predicted device bytes where the table has them (the card must hold them), else tensor bytes
    held = curves["device_bytes"] if "device_bytes" in curves else curves["total_bytes"]
    curves["GiB"] = held.fillna(curves["total_bytes"]) / 2**30
    curves["checkpointing"] = curves["gradient_checkpointing"].map({False: "no", True: "yes"})
    curves = _merge_identical_series(curves)
    order = sorted(curves["experiment"].unique(), key=lambda label: _technique_key(label.split(SAME)[0]))
    fig, ax = plt.subplots(figsize=(10, 5.2))
    sns.lineplot(curves, x="seq_len", y="GiB", hue="experiment", hue_order=order, style="checkpointing",
                 style_order=["no", "yes"], markers=True, dashes={"no": "", "yes": (4, 2)}, ax=ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    seqs = sorted(curves["seq_len"].unique())
    ax.set_xticks(seqs, [f"{s:,}" for s in seqs])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    for sizes in table["cards"].values():
        ax.axhline(sizes["cap_bytes"] / 2**30, color="#57606a", linewidth=0.8, linestyle=":")
    ax.set_xlabel("sequence length (tokens, micro-batch 1)")
    ax.set_ylabel("predicted device bytes, GiB (log scale)")
    # the cards named on a right-hand axis at their lines' heights: a name inside the panel sits on the points
    cards = ax.twinx()
    cards.set_yscale("log", base=2)
    cards.set_ylim(ax.get_ylim())
    cards.set_yticks([sizes["cap_bytes"] / 2**30 for sizes in table["cards"].values()],
                     [f"{card} GB card" for card in table["cards"]], fontsize=8, color="#57606a")
    cards.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    cards.grid(False)
    cards.set_ylabel("card as sold (dotted), GiB as at left", color="#57606a")
    model = curves["model"].iloc[0]
    ax.set_title(f"{model_name(model)}: predicted device bytes of one step (analytic)", fontsize=10)
    title = f"Peak memory against sequence length ({model_name(model)}), with the cards"
    fig.tight_layout()
    # the legend beside the cards' names, which are only measured once the layout is final
    renderer = fig.canvas.get_renderer()
    panel = ax.get_window_extent(renderer)
    beside = (cards.get_tightbbox(renderer).x1 - panel.x0) / panel.width
    sns.move_legend(ax, "upper left", bbox_to_anchor=(beside + 0.01, 1), fontsize=7, ncol=2)
    caption = (f"{model}: the predicted device bytes of one training step at micro-batch 1 per technique (the "
               "analytic peak, the caching allocator's reserve, the CUDA context, kernels and unified memory), without "
               "(solid) and with (dashed) gradient checkpointing, against each card (dotted: the card as sold, in GiB). "
               + "".join(f"{' and '.join(label.split(SAME))} are predicted the same at every length and share "
                         f"a line (\"{label}\"). " for label in order if SAME in label)
               + "A technique fits a card up to where its line crosses the card's. Predicted, not measured; `python -m harness predict --solve seq_len` "
               "checks any one crossing by simulation.")
    return FigureResult(name, title, caption, _png(fig))


# --- 6. gradient accumulation ----------------------------------------------------------------------

def accumulation(results: Results, runs: pd.DataFrame) -> FigureResult:
    name, title = "gradient-accumulation", "Gradient accumulation: memory and equivalence"
    done = runs[(runs["status"] == "ok") & runs["peak_allocated"].notna() & runs["budget_gb"].isna()].copy()
    series = pd.DataFrame()
    if not done.empty:
        done["device"] = done.apply(_gpu_label, axis=1)
        done["group"] = (done["experiment"] + " @ " + done["model"].map(model_name) + ", seq " + done["seq_len"].astype(str)
                         + " x " + done["micro_batch"].astype(str) + " | " + done["device"])
        counts = done.groupby("group")["grad_accum"].nunique()
        series = done[done["group"].isin(counts[counts >= 2].index)]
        series = series.sort_values(["group", "grad_accum", "file"]).drop_duplicates(["group", "grad_accum"])
    probe = results.probes.get("accumulation_equivalence")
    if series.empty and not probe:
        return FigureResult(name, title, "", missing=(
            "No runs at several accumulation steps and no accumulation probe: `make bench` runs the accumulation "
            "block, `python -m harness probes` writes results/probes/accumulation_equivalence.json."))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    notes = []
    if not series.empty:
        # each line against its own k = 1 run: a GPU's GB and a CPU's tracked MB read on one axis
        series = series[series["group"].isin(series.loc[series["grad_accum"] == 1, "group"])]
        first = series[series["grad_accum"] == 1].set_index("group")["peak_allocated"]
        series = series.assign(extra_pct=(series["peak_allocated"] / series["group"].map(first) - 1) * 100)
        sns.lineplot(data=series, x="grad_accum", y="extra_pct", hue="group", marker="o", ax=axes[0],
                     hue_order=sorted(series["group"].unique()))
        axes[0].set_xscale("log", base=2)
        ks = sorted(series["grad_accum"].unique())
        axes[0].set_xticks(ks, [str(int(k)) for k in ks])
        top = max(2.0, series["extra_pct"].abs().max() * 1.5)
        axes[0].set_ylim(-top, top)
        axes[0].set_xlabel("accumulation steps k (fixed micro-batch)")
        axes[0].set_ylabel("peak over the k = 1 run's, %")
        axes[0].set_title("extra memory of accumulating (each line: its model, shape and device)", fontsize=9)
        axes[0].legend(fontsize=7)
        notes.append("left: peak memory of the same micro-batch at k = "
                     + ", ".join(str(int(k)) for k in sorted(series["grad_accum"].unique()))
                     + " on " + ", ".join(sorted(series["device"].unique())) + ", as a percentage of the k = 1 run's")
    else:
        axes[0].text(0.5, 0.5, "no runs at several k:\n`make bench`", ha="center", va="center")
        axes[0].set_axis_off()
    if probe:
        rows = pd.DataFrame(probe["rows"])
        rows = rows[rows["k"] > 1]  # k = 1 compares a batch with itself
        rows = rows.assign(error=rows["max_relative_gradient_error"].clip(lower=1e-16))
        sns.lineplot(data=rows, x="k", y="error", marker="o", ax=axes[1], label="largest relative difference")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xticks(rows["k"].tolist(), [str(int(k)) for k in rows["k"]])
        axes[1].set_yscale("log")
        eps = float(np.finfo(np.float32).eps)
        axes[1].axhline(eps, color="grey", linestyle=":", label="fp32 eps")
        axes[1].set_ylim(min(eps, rows["error"].min()) / 3, max(eps, rows["error"].max()) * 3)
        axes[1].legend(fontsize=7)
        axes[1].set_xlabel("k micro-batches vs one batch of k x m")
        axes[1].set_ylabel("max relative gradient difference")
        axes[1].set_title(f"{probe.get('model')}: accumulated against one large batch", fontsize=9)
        notes.append(f"right: the accumulation probe on {probe.get('device')} ({probe.get('model')}, fp32), "
                     "against fp32's machine epsilon")
    else:
        axes[1].text(0.5, 0.5, "no accumulation probe:\n`python -m harness probes`", ha="center", va="center")
        axes[1].set_axis_off()
    fig.tight_layout()
    caption = ("Gradient accumulation should cost no memory and change no gradient: " + "; ".join(notes) + ". "
               "CPU memory is tracked tensor bytes.")
    return FigureResult(name, title, caption, _png(fig))


# --- 7. quantization error ----------------------------------------------------------------------

def quantization_error(results: Results) -> FigureResult:
    name, title = "quantization-error", "int8 absmax error against the clipping threshold, beside NF4"
    probe = results.probes.get("quantization_error")
    if not probe or not probe.get("int8_absmax"):
        return FigureResult(name, title, "", missing=(
            "No quantization probe: `python -m harness probes` writes results/probes/quantization_error.json."))
    sweep = pd.DataFrame(probe["int8_absmax"]).sort_values("clip_ratio")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    sns.lineplot(data=sweep, x="clip_ratio", y="relative_rmse", marker="o", ax=ax, label="int8 absmax, one scale per tensor")
    nf4 = (probe.get("nf4") or {}).get("relative_rmse")
    rowwise = (probe.get("int8_rowwise") or {}).get("relative_rmse")
    if nf4 is not None:
        ax.axhline(nf4, color="firebrick", linestyle="--", label=f"NF4, blocks of {probe['nf4'].get('blocksize', 64)}")
    if rowwise is not None:
        ax.axhline(rowwise, color="seagreen", linestyle=":", label="LLM.int8 row-wise")
    best = sweep.loc[sweep["relative_rmse"].idxmin()]
    ax.axvline(best["clip_ratio"], color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("clip threshold / max|w|")
    ax.set_ylabel("relative RMSE (error / RMS of the weights)")
    weights_of = (probe.get("weights") or {}).get("source", "?")
    ax.set_title(f"weights of {weights_of}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    weights = probe.get("weights") or {}
    caption = (f"Relative RMSE of int8 absmax quantization as the clip threshold sweeps from "
               f"{sweep['clip_ratio'].min():g} to {sweep['clip_ratio'].max():g} of max|w| (tight thresholds clip, "
               f"loose ones round coarsely; best at {best['clip_ratio']:g}), beside NF4 and row-wise int8 on the same "
               f"tensors. Weights: {weights.get('source', '?')} ({'trained' if weights.get('trained') else 'untrained'}, "
               f"{weights.get('tensors', '?')} tensors); computed on {probe.get('device')}, a device-independent fact.")
    return FigureResult(name, title, caption, _png(fig))


def optimisation_ladder(runs: pd.DataFrame, predictions: pd.DataFrame) -> FigureResult:
    from harness.report import ladder

    name, title = "optimisation-ladder", "The optimisation ladder, one technique at a time"
    rows = ladder.ladder_rows(predictions, runs)
    drawn = rows[rows["predicted"].notna()].reset_index(drop=True)
    if drawn.empty:
        return FigureResult(name, title, "", missing=(
            f"No prediction of the ladder's rungs at {ladder.MODEL}: `python -m harness predict --claims` "
            "predicts them."))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    bottom = np.zeros(len(drawn))
    for category in CATEGORIES:
        values = drawn[category].fillna(0).to_numpy(dtype=float) / 2**30
        ax.bar(range(len(drawn)), values, 0.6, bottom=bottom, color=CATEGORY_COLORS[category],
               label=CATEGORY_WORDS[category], edgecolor="white", linewidth=0.4)
        bottom += values
    theirs = drawn["theirs_gib"]
    ax.plot(range(len(drawn)), theirs, marker="D", color="black", linestyle="", label=ladder.TORCHTUNE, zorder=5)
    measured = drawn["measured"].dropna()
    if len(measured):
        ax.plot(measured.index, measured / 2**30, marker="o", color="firebrick", linestyle="",
                label="ours, measured", zorder=6)
    ax.set_xticks(range(len(drawn)), drawn["label"], rotation=20, ha="right", fontsize=9)
    ax.set_ylabel("peak GiB (2^30 bytes)")
    ax.set_title(f"{ladder.MODEL}, micro-batch {ladder.MICRO_BATCH} x {ladder.SEQ_LEN:,} tokens: bars predicted, "
                 "dots as marked", fontsize=9)
    ax.grid(axis="x", visible=False)
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    caption = (f"Predicted peak of one step by category for each rung, {ladder.MODEL} at micro-batch "
               f"{ladder.MICRO_BATCH} x {ladder.SEQ_LEN:,} tokens (CUDA code path; simulated where it ran, else "
               "analytic), with torchtune's published figure for the same rung (black diamonds) and our "
               "measurement where a GPU run exists. The table below says where the rungs differ.")
    return FigureResult(name, title, caption, _png(fig))


# What each figure is (measured, predicted or both) and the commands that make its inputs again; the
# report itself is `python -m harness report`.
PROVENANCE = {
    "memory-breakdown": ("measured (GPU records) and predicted (analytic, simulated)",
                         "`make bench` on a CUDA machine; `python -m harness predict --claims`"),
    "throughput-vs-memory": ("measured (GPU records)", "`make bench` on a CUDA machine"),
    "loss-curves": ("measured (records of fine-tunes on the lab's pretrained base)", "`make base`, then `make bench`"),
    "predicted-vs-measured": ("predicted against measured (GPU and CPU records)",
                              "`python -m harness predict --claims`; `make bench`"),
    "fits-in-budget": ("measured under an emulated budget, and predicted",
                       "`python -m harness run experiments/E.yaml --model M --budget-gb GB`; "
                       "`python -m harness predict --claims`"),
    "memory-vs-sequence": ("predicted (analytic)", "`python -m harness predict --claims`"),
    "optimisation-ladder": ("predicted, with GPU measurements where they exist",
                            "`python -m harness predict --claims`; `make bench` on a CUDA machine"),
    "gradient-accumulation": ("measured (records at k = 1, 2, 4, 8) and computed (the accumulation probe)",
                              "`make bench`; `python -m harness probes`"),
    "quantization-error": ("computed (the quantization probe)", "`python -m harness probes`"),
}


def _with_provenance(figure: FigureResult) -> FigureResult:
    what, how = PROVENANCE.get(figure.name, ("", ""))
    if figure.png is None or not what:
        return figure
    return replace(figure, caption=f"{figure.caption} What it is: {what}. Reproduce: {how}.")


def all_figures(results: Results, runs: pd.DataFrame, predictions: pd.DataFrame,
                claims: list[Claim]) -> list[FigureResult]:
    # seaborn's contexts set rcParams of their own; STYLE goes on top of them
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9), plt.rc_context(STYLE):
        return [_with_provenance(figure) for figure in [
            memory_breakdown(results, runs, predictions, claims),
            throughput_vs_memory(runs),
            final_losses(results),
            parity(runs, predictions),
            fits_grid(runs, predictions, (results.fits or {}).get("rows")),
            memory_vs_sequence(results),
            optimisation_ladder(runs, predictions),
            accumulation(results, runs),
            quantization_error(results),
        ]]
