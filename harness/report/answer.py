"""The report's first screen: for a model and a card, the recipes that fit, with the memory the card
must hold, the longest sequence and the speed, each figure marked measured or predicted.

Built from the fit table (results/fits/, predicted: the analytic search, its longest sequences confirmed by
simulation where a row says so) and the CUDA run records.
A fit row may carry the predicted figures `device_bytes` (what the card must hold, the caching
allocator included), `margin_bytes`, `device_bytes_at` (the same at each sequence length up to the longest, which
the picker shows for the length picked), `tokens_per_s`, `step_time_s` and `cost_usd`; where a row has
them they are shown, and where it does not, the tensor peak at the reference shape
(`reference_peak_bytes`) and the tokens/s a GPU run measured stand in, each saying which it is.
The same data drive the static tables (Markdown and HTML) and the HTML picker, which reads them as
JSON embedded in the page: no server, nothing fetched.
"""

from __future__ import annotations

import html
import json
import math

from harness.cards import card_bytes
from harness.report.load import Results, _get, random_init
from harness.report.tables import Cell, Table
from harness.report.units import fmt_bytes

# a fit row's answer with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (harness.predict.fit_table.EXPANDABLE)
EXPANDABLE = "expandable_segments"

SHORTEST_CHOICE = 512  # the picker's first "at least this long" option; it doubles up to the table's longest answer
# The fit table sizes a fine-tune of pretrained weights (harness.predict.search, RANDOM_WEIGHTS); the lab's GPU runs
# and its prediction files start from random weights. Where the two analytic predictions of one step differ by more
# than this share, the weights' values change its bytes (LLM.int8's outlier columns), and a random-init run does not
# stand for the fit answer: it is shown beside the answer's own prediction, not as it. Every other recipe's two
# predictions agree to the byte.
VALUES_CHANGE_BYTES = 0.005


def recipe_name(experiment: str, checkpointing: bool) -> str:
    return f"{experiment} + checkpointing" if checkpointing else experiment


def lab_experiment(experiment: str, checkpointing: bool) -> str:
    """The experiment file that runs the fit row's technique (the lab names checkpointed ones `<name>-gc`)."""
    return f"{experiment}-gc" if checkpointing else experiment


def random_weights_peaks(results: Results) -> dict[tuple[str, str], int]:
    """{(model, experiment): the analytic tensor peak at the fit table's reference shape for random weights (the
    prediction files')} where it differs from the fit row's, for pretrained weights, by more than VALUES_CHANGE_BYTES."""
    table = results.fits
    if not table:
        return {}
    reference = tuple(table.get("reference_shape") or (512, 1))
    random_weights = {(p.get("model"), p.get("experiment")): p.get("total_bytes") for p in results.predictions
                      if (p.get("seq_len"), p.get("micro_batch"), p.get("device_type"), p.get("method"),
                          p.get("world_size") or 1) == (*reference, "cuda", "analytic", 1)}
    found = {}
    for row in table["rows"]:
        key = (row["model"], lab_experiment(row["experiment"], bool(row["gradient_checkpointing"])))
        peak, pretrained = random_weights.get(key), row.get("reference_peak_bytes")
        if peak and pretrained and abs(peak / pretrained - 1) > VALUES_CHANGE_BYTES:
            found[key] = peak
    return found


def random_weights_words(random_peak: int, pretrained_peak: int) -> str:
    """Why a random-init run does not stand for a fit answer, with the two predictions that say so."""
    more = "more" if random_peak > pretrained_peak else "less"
    return (f"the weights' values change this step's bytes (LLM.int8's outlier columns): from random weights it holds "
            f"{more} than from the pretrained weights the fit answers size (tensor peak at the reference shape, "
            f"analytic: {fmt_bytes(random_peak)} against {fmt_bytes(pretrained_peak)})")


def _single_gpu_runs(results: Results, model: str, experiment: str) -> list[dict]:
    """Finished or OOM CUDA records of one model and experiment: one GPU, no accumulation, the whole card."""
    found = []
    for record in results.records:
        config = record.get("config") or {}
        if (record.get("model"), record.get("experiment")) != (model, experiment):
            continue
        if _get(record, "environment", "device_type") != "cuda" or record.get("status") not in ("ok", "oom"):
            continue
        if (config.get("grad_accum") or 1) != 1 or (config.get("world_size") or 1) != 1:
            continue
        if _get(record, "budget", "budget_gb") is not None:
            continue
        found.append(record)
    return sorted(found, key=lambda r: (r.get("status") != "ok", r.get("_file", "")))


def _shape(record: dict) -> str:
    config = record.get("config") or {}
    return f"sequence {config.get('seq_len'):,} x micro-batch {config.get('micro_batch')}"


def _rerun(record: dict) -> str:
    config = record.get("config") or {}
    return (f"`make bench` on a CUDA machine reruns the matrix cell {record['experiment']} @ {record['model']}, "
            f"{config.get('seq_len')} x {config.get('micro_batch')}")


def _held(memory: dict) -> tuple[int | None, str]:
    """What a GPU run's card held: NVML's device-used (the context included), else the allocator's reserved."""
    if memory.get("peak_device_used"):
        return memory["peak_device_used"], "device-used (NVML)"
    return memory.get("peak_reserved"), "reserved by torch's caching allocator"


def trainer_default_line(results: Results, model: str, card_gb: int = 80) -> str | None:
    """What Trainer's `bf16=True` runs (bf16-mixed) held at `model` on a GPU, against a card of `card_gb`."""
    for record in _single_gpu_runs(results, model, "bf16-mixed"):
        held, what = _held(record.get("memory") or {})
        if record.get("status") != "ok" or not held:
            continue
        device = _get(record, "environment", "device_name")
        card = f"{'an' if str(card_gb).startswith('8') else 'a'} {card_gb} GB card"
        return (f"What transformers' Trainer runs for `bf16=True` on a model loaded in fp32 is bf16-mixed (fp32 "
                f"weights, gradients and AdamW states; bf16 only in the matrix products): the lab's own loop ran that "
                f"recipe at {model}, {_shape(record)}, and held {fmt_bytes(held)}, {what}, on {device} "
                f"({record['_file']}): " + (f"within {card}" if held <= card_bytes(card_gb) else f"more than {card} holds")
                + " (Trainer's own runs are set beside the lab's loop in \"Our loop against Trainer\").")
    return None


def _solve_command(row: dict, card_gb: int, model: str) -> str:
    return (f"`python -m harness predict --model {model} --experiment {row['experiment']} "
            f"{'--checkpointing ' if row['gradient_checkpointing'] else ''}--card {card_gb} --solve seq_len`")


def _measured_memory(runs: list[dict], shape: tuple[int, int]) -> dict | None:
    """What the card held in the first finished GPU run at `shape` (sequence, micro-batch), or None."""
    for record in runs:
        config = record.get("config") or {}
        held, what = _held(record.get("memory") or {})
        if (config.get("seq_len"), config.get("micro_batch")) == tuple(shape) and record.get("status") == "ok" and held:
            device = _get(record, "environment", "device_name")
            return {"bytes": held, "kind": "measured", "short": f"{what}, {device}, {record['_file']}",
                    "what": f"{what} at {_shape(record)}, measured on {device} ({record['_file']})",
                    "how": _rerun(record), "random_init": random_init(record)}
    return None


def stands_for_answer(random_init, random_peak: int | None) -> bool:
    """Whether a run's measurement stands for a fit answer: unless the weights' values change the step's bytes
    (`random_peak`, random_weights_peaks) and the run is not known to start from pretrained weights (its record's
    `random_init` False, as a bool or numpy's in a frame; None or NaN: not known)."""
    known = random_init is not None and random_init == random_init  # NaN is not equal to itself
    return random_peak is None or (known and not random_init)


def _memory(row: dict, runs: list[dict], reference: tuple[int, int], card_gb: int, model: str,
            random_peak: int | None = None) -> dict:
    """The memory the card must hold: measured at the reference shape where a GPU run exists and stands for the
    answer, else predicted (`random_peak`: the step's random-weights tensor peak where the weights' values change
    its bytes, random_weights_peaks; a random-init run is then said beside the prediction)."""
    measured = _measured_memory(runs, reference)
    if measured and stands_for_answer(measured.get("random_init"), random_peak):
        if row.get("reference_device_bytes") is None:
            return measured
        # the prediction beside, so that a measured row and a predicted neighbour (the same recipe with
        # checkpointing) are compared on one basis, not a measurement against a prediction
        return {**measured, "short": f"{measured['short']}; predicted {fmt_bytes(row['reference_device_bytes'])}"}
    solve = _solve_command(row, card_gb, model)
    if row.get("reference_device_bytes") is not None:
        what = (f"the card must hold this at sequence {reference[0]:,} x micro-batch {reference[1]}, the "
                "caching allocator and the CUDA context included (analytic prediction)")
        short = "card must hold, allocator and context included, analytic"
        if measured:
            what += (f"; a run from random weights measured {fmt_bytes(measured['bytes'])} ({measured['what']}), but "
                     + random_weights_words(random_peak, row["reference_peak_bytes"]))
            short += f", for pretrained weights (a run from random weights held {fmt_bytes(measured['bytes'])})"
        return {"bytes": row["reference_device_bytes"], "kind": "predicted", "short": short, "what": what,
                "how": solve}
    return {"bytes": row.get("reference_peak_bytes"), "kind": "predicted", "short": "tensor peak, analytic",
            "what": f"tensor peak at sequence {reference[0]:,} x micro-batch {reference[1]} (analytic prediction); "
                    "the caching allocator and the CUDA context add to it",
            "how": solve}


def _article(name: str) -> str:
    """"an" before a name said with a vowel sound first (an RTX 4090, an H100, an A100), else "a" (a T4)."""
    return "an" if name[:1].upper() in "AEFHILMNORSX8" else "a"


def search_words(method: str | None) -> str:
    """A fit table's method (harness.predict.fit_table: "analytic", or "analytic+simulated" where answers the card
    limits are confirmed by simulation) as words."""
    if method and method.endswith("+simulated"):
        return ("analytic search, its answers at the card's limit confirmed by simulation, the caching allocator "
                "replayed under each card's cap")
    return f"{method or 'analytic'} search"


def expandable_answer(row) -> dict | None:
    """A fit row's longest sequence with expandable segments where the simulation confirmed it, else None: its
    analytic answer counts no fragmentation at all, so only a simulated one says what the setting buys."""
    answer = row.get(EXPANDABLE)
    if isinstance(answer, dict) and answer.get("seq_len_method") == "simulated":
        return answer
    return None


def _longest_what(row: dict) -> str:
    """How the longest sequence was found, and what the card holds there (the margin it leaves)."""
    what = f"longest sequence at micro-batch 1, {seq_method(row)}"
    if row.get("device_bytes") is not None and row["max_seq_len"] > 0:
        what += f"; the card holds {fmt_bytes(row['device_bytes'])} there, the allocator and the context included"
        if row.get("margin_bytes") is not None:
            what += f", {fmt_bytes(row['margin_bytes'])} left"
    expandable = expandable_answer(row)
    if expandable is not None and row["max_seq_len"] > 0 and expandable["max_seq_len"] != row["max_seq_len"]:
        what += (f"; with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, {expandable['max_seq_len']:,} tokens "
                 "(confirmed by simulation)")
    return what


def seq_method(row: dict) -> str:
    """Which method answered a fit row's longest sequence (harness.predict.confirm), in words."""
    analytic, fails_at = row.get("analytic_max_seq_len"), row.get("simulated_fails_at")
    if row.get("seq_len_method") == "simulated":
        said = "confirmed by simulation (the step traced, its caching allocator replayed under the card's cap)"
        if fails_at is not None:
            said += f"; the formula said {analytic:,}, the simulation runs out at {fails_at:,}"
        return said
    if fails_at is not None:
        return (f"analytic search; the simulation runs out at {fails_at:,} and found no shorter length that fits "
                "in its steps")
    return "analytic search" + (", not yet confirmed by simulation" if row.get("seq_len_limited_by") == "card"
                                and row["max_seq_len"] > 0 else "")


def _speed(row: dict, runs: list[dict], model: str, experiment: str, card: dict) -> dict | None:
    """Tokens per second: predicted where the fit row has it (on the GPU the fit table takes for the card, at the
    row's speed shape), else what a GPU run measured (any shape, said). The fit table's analytic speed times the
    matrix products alone (harness.predict.speed.analytic_speed): an upper bound, said so (`bound`), and so are
    the hours and dollars derived from it lower bounds."""
    if row.get("tokens_per_s") is not None:
        gpu, shape = card.get("gpu"), row.get("speed_shape")
        bound = row.get("speed_method", "analytic") == "analytic"
        on = " ".join(part for part in (f"on {_article(gpu)} {gpu}" if gpu else "",
                                        f"at {shape[0]:,} x {shape[1]}" if shape else "") if part)
        label = ("upper bound (matrix products alone) " if bound else "predicted ") + on
        extra = []
        if row.get("step_time_s") is not None:
            extra.append(f"{'at least ' if bound else ''}{row['step_time_s']:.3g} s a step")
        if row.get("hours_per_100m_tokens") is not None:
            extra.append(f"{'at least ' if bound else ''}{row['hours_per_100m_tokens']:.3g} GPU-hours"
                         + (f" and ${row['cost_usd']:.3g} at ${card['price_per_hour']:g} an hour"
                            if row.get("cost_usd") is not None and card.get("price_per_hour") else "")
                         + " for 100M tokens")
        return {"tokens_per_s": row["tokens_per_s"], "kind": "predicted", "bound": bound, "short": label.strip(),
                "hours_per_100m_tokens": row.get("hours_per_100m_tokens"),
                "cost_usd": row.get("cost_usd") if card.get("price_per_hour") else None,
                "what": label.strip() + (f" ({'; '.join(extra)})" if extra else ""),
                "how": f"`python -m harness predict --model {model} --experiment {experiment}"
                       + (f" --gpu '{gpu}'` (the kernel model, tighter than this bound)" if gpu else "`")}
    return _measured_speed(runs)


def speed_text(speed: dict) -> str:
    """Tokens per second as a cell shows it: "<=" before an upper bound."""
    return f"{'≤ ' if speed.get('bound') else ''}{speed['tokens_per_s']:,.0f}"


def hours_text(speed: dict) -> str:
    """The GPU-hours and dollars of 100M tokens a predicted speed gives, "≥" before those of an upper bound on the
    speed (lower bounds, then); empty where the fit row has none."""
    if speed.get("hours_per_100m_tokens") is None:
        return ""
    at_least = "≥ " if speed.get("bound") else ""
    dollars = f", {at_least}${speed['cost_usd']:.3g}" if speed.get("cost_usd") is not None else ""
    return f"100M tokens: {at_least}{speed['hours_per_100m_tokens']:.3g} GPU-hours{dollars}"


def _measured_speed(runs: list[dict]) -> dict | None:
    """What the first finished GPU run of a recipe measured, its device and shape said."""
    for record in runs:
        speed = _get(record, "throughput", "tokens_per_s")
        if record.get("status") == "ok" and speed:
            device = _get(record, "environment", "device_name")
            return {"tokens_per_s": speed, "kind": "measured",
                    "short": f"{device}, {_shape(record)}, {record['_file']}",
                    "what": f"measured on {device} at {_shape(record)} ({record['_file']}); another card runs at "
                            "another speed",
                    "how": _rerun(record)}
    return None


def answer_data(results: Results) -> dict | None:
    """{cards, models, reference, rows: [{model, card_gb, recipe, fits, max_seq_len, ...}]} or None."""
    table = results.fits
    if not table:
        return None
    reference = tuple(table.get("reference_shape") or (512, 1))
    cards = {int(gb): card for gb, card in table["cards"].items()}  # the GPU a card's speed is predicted on, its price
    random_peaks = random_weights_peaks(results)
    rows = []
    for row in table["rows"]:
        model, checkpointing = row["model"], bool(row["gradient_checkpointing"])
        experiment = lab_experiment(row["experiment"], checkpointing)
        runs = _single_gpu_runs(results, model, experiment)
        random_peak = random_peaks.get((model, experiment))
        rows.append({
            "model": model, "card_gb": int(row["card_gb"]),
            "recipe": recipe_name(row["experiment"], checkpointing), "experiment": experiment,
            "fits": row["max_seq_len"] > 0, "max_seq_len": row["max_seq_len"],
            "longest_what": _longest_what(row),
            "limited_by": row.get("seq_len_limited_by"), "max_micro_batch": row.get("max_micro_batch"),
            "memory": _memory(row, runs, reference, int(row["card_gb"]), model, random_peak),
            # at each sequence length up to the longest, micro-batch 1: predicted, and measured where a run that
            # stands for the answer was (_stands)
            "memory_at": row.get("device_bytes_at") or {},
            "measured_at": {seq: found for seq in row.get("device_bytes_at") or {}
                            if (found := _measured_memory(runs, (int(seq), 1)))
                            and stands_for_answer(found.get("random_init"), random_peak)},
            "solve": _solve_command(row, int(row["card_gb"]), model),
            "speed": _speed(row, runs, model, experiment, cards.get(int(row["card_gb"]), {})),
            "measured_speed": _measured_speed(runs),
        })
    longest = max((r["max_seq_len"] for r in rows), default=SHORTEST_CHOICE)
    return {"cards": sorted(cards), "gpus": {gb: card.get("gpu") for gb, card in cards.items()},
            "models": list(dict.fromkeys(r["model"] for r in rows)),
            "seq_choices": [SHORTEST_CHOICE * 2**i for i in range(max(longest // SHORTEST_CHOICE, 1).bit_length())],
            "reference": list(reference), "micro_batch_seq_len": table.get("micro_batch_seq_len"),
            "method": table.get("method"), "rows": rows}


def _seq_words(entry: dict, unit: str = "", context: str = " (the model's context length)") -> str:
    text = f"{entry['max_seq_len']:,}{unit}"
    return text + context if entry["limited_by"] == "context" else text


def summary_table(data: dict) -> Table:
    """Models as rows, card classes as columns: how many recipes fit and the longest sequence. No "fastest": the
    fit table's speeds are upper bounds, which rank recipes by their matrix products alone (LoRA's fewer FLOPs
    first, where its adapters' kernels make it slower on a GPU)."""
    lines = []
    for model in data["models"]:
        line = [Cell(model)]
        for card in data["cards"]:
            entries = [e for e in data["rows"] if e["model"] == model and e["card_gb"] == card]
            fitting = [e for e in entries if e["fits"]]
            if not fitting:
                line.append(Cell("nothing fits", f"none of the {len(entries)} recipes at micro-batch 1 (predicted)",
                                 css="status-oom"))
                continue
            line.append(Cell(f"{len(fitting)} of {len(entries)} recipes", _longest_words(fitting, data["reference"])))
        lines.append(line)
    columns = ["Model"] + [_card_heading(data, card) for card in data["cards"]]
    return Table(columns, lines, css="answer")


def _longest_words(fitting: list[dict], reference: list[int]) -> str:
    """The recipe that reaches the longest sequence; where several reach it, how many and which of them the picker
    lists first at that length (the least memory), never the first in the fit table's order (often the heaviest)."""
    longest = max(e["max_seq_len"] for e in fitting)
    tied = picker_order([e for e in fitting if e["max_seq_len"] >= longest], longest)
    if len(tied) == 1:
        longest_words = _seq_words(tied[0], " tokens", ", the model's context length")
        return f"longest: {tied[0]['recipe']}, {longest_words} (predicted)"
    reach = "the model's context, " if all(e["limited_by"] == "context" for e in tied) else ""
    at = f"{longest:,} x 1" if picker_memory_at_length(tied, longest) else f"{reference[0]:,} x {reference[1]}"
    return (f"{len(tied)} recipes reach {reach}{longest:,} tokens; least memory at {at}: {tied[0]['recipe']} "
            "(predicted)")


def picker_memory(entry: dict, seq: int) -> dict | None:
    """A recipe's memory at `seq` x 1 as the picker shows it (its script's `at`): measured where a run was, else
    predicted, None where the fit table has no figure there. The keys are strings, as in the page's JSON."""
    if entry["measured_at"].get(str(seq)):
        return entry["measured_at"][str(seq)]
    if str(seq) in entry["memory_at"]:
        return {"bytes": entry["memory_at"][str(seq)], "kind": "predicted"}
    return None


def picker_memory_at_length(fit: list[dict], seq: int) -> bool:
    """Whether the picker shows memory at `seq` (its script's `atSeq`): only where every recipe listed has it there,
    else the reference shape's for all, so that one column compares like with like."""
    return all(picker_memory(e, seq) for e in fit)


def picker_order(fit: list[dict], seq: int) -> list[dict]:
    """The recipes fitting at least `seq` tokens in the picker's order: the longest sequence first, then the least
    memory as its column shows it. PICKER_SCRIPT's sort is this key in JavaScript: change both together (a test
    compares them in a browser)."""
    at_length = picker_memory_at_length(fit, seq)

    def shown_bytes(entry: dict) -> float:
        return (picker_memory(entry, seq) if at_length else entry["memory"])["bytes"] or 0

    return sorted(fit, key=lambda e: (-e["max_seq_len"], shown_bytes(e)))


def _card_heading(data: dict, card: int) -> str:
    gpu = (data.get("gpus") or {}).get(card)
    return f"{card} GB card" + (f" ({gpu})" if gpu else "")


def _predicted_speed_words(speed: dict | None) -> str:
    """A card's predicted tokens/s, what it is, and the hours and dollars of 100M tokens it gives."""
    if not speed or speed["kind"] != "predicted":
        return ""
    return "; ".join(part for part in (f"{speed_text(speed)} tokens/s, {speed['short']}", hours_text(speed)) if part)


# What a T4 offers CUDA with ECC on, its default: deviceQuery's "Total amount of global memory: 15110 MBytes
# (15843721216 bytes)". The 16 GB column is a card that holds 16 GiB (harness.cards.card_bytes); the T4 names its
# speed and price only.
T4_CUDA_BYTES = 15_843_721_216


def _t4_words(data: dict) -> str:
    """Where a column's speed is a T4's: that a T4 holds less than the column's card, and the card to ask for it."""
    columns = [card for card in data["cards"] if data.get("gpus", {}).get(card) == "T4"]
    if not columns:
        return ""
    gib = math.floor(T4_CUDA_BYTES / 2**30 * 100) / 100  # rounded down: an answer for it must not over-promise
    return (f" The {columns[0]} GB column is a card that holds {columns[0]} GiB; a T4, whose speed and price it gives, "
            f"offers CUDA {gib} GiB with ECC on (its default; deviceQuery's 15,110 MiB), so its own answers are "
            f"`--card {gib}`'s.")


def model_table(data: dict, model: str) -> Table:
    """One model, recipe by recipe: the longest sequence on each card, the memory, the speed."""
    recipes = list(dict.fromkeys(e["recipe"] for e in data["rows"] if e["model"] == model))
    lines = []
    for recipe in recipes:
        entries = {e["card_gb"]: e for e in data["rows"] if e["model"] == model and e["recipe"] == recipe}
        first = next(iter(entries.values()))
        memory, measured = first["memory"], first["measured_speed"]
        line = [Cell(recipe),
                Cell(f"{fmt_bytes(memory['bytes'])} {memory['kind']}", memory["short"])
                if memory["bytes"] is not None else Cell("-", "no peak in the fit table's row"),
                Cell(f"{measured['tokens_per_s']:,.0f}", measured["short"])
                if measured else Cell("-", "no GPU run of this recipe and model")]
        for card in data["cards"]:
            entry = entries[card]
            speed = entry["speed"]
            line.append(Cell(_seq_words(entry, context=" (context)"), _predicted_speed_words(speed)) if entry["fits"]
                        else Cell("does not fit", css="status-oom"))
        lines.append(line)
    reference = data["reference"]
    columns = ["Recipe", f"Memory at {reference[0]:,} x {reference[1]}", "Tokens/s measured"] + [
        f"{_card_heading(data, card)}: longest sequence" for card in data["cards"]]
    note = ("Measured memory: what the card held on the device named (NVML's device-used, else what torch's caching "
            "allocator reserved), its record beside; `make bench` on a CUDA machine runs the cell again. Predicted "
            "memory: what the card must hold there (analytic: the tensors, the caching allocator and the CUDA "
            "context), or where a fit table lacks it the analytic tensor peak; `python -m harness predict --model "
            f"{model} --experiment E [--checkpointing] --card GB --solve seq_len` confirms one cell by simulation. Longest "
            f"sequence: at micro-batch 1, predicted by the {search_words(data['method'])}; (context): the "
            "model's context length is reached before the card is full. Tokens/s measured: on the device and at the "
            "shape named (another card runs at another speed); under each card, an upper bound on the tokens/s of the "
            "GPU its heading names, at the shape named (matrix products alone). A T4 has no bf16 tensor cores "
            "(harness/cards.py): its bounds for bf16 recipes take its fp32 rate, and fp16-mixed is the recipe its "
            "tensor cores run." + _t4_words(data))
    return Table(columns, lines, css="fits", numeric=set(range(3, 3 + len(data["cards"]))), note=note)


# --- the HTML picker ---------------------------------------------------------------------------

PICKER_SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('answer-data').textContent);
  const pick = id => document.getElementById(id);
  // GB and GiB, as every table gives bytes: a card sold as "N GB" holds N GiB, and a figure in GB alone reads as over it
  const gb = b => (b === null || b === undefined) ? '\u2013'
    : (b / 1e9).toFixed(2) + ' GB (' + (b / 2 ** 30).toFixed(2) + ' GiB)';
  const esc = t => String(t).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
  const article = card => (String(card)[0] === '8' || card === 18 || card === 11 ? 'an ' : 'a ');
  const mark = (kind, what, how) =>
    ' <span class="mark ' + kind + '" title="' + esc(what + ' \u2014 reproduce: ' + how.replace(/`/g, '')) + '">' +
    kind + '</span>';
  function show() {
    const model = pick('pick-model').value, card = Number(pick('pick-card').value), seq = Number(pick('pick-seq').value);
    const rows = data.rows.filter(r => r.model === model && r.card_gb === card);
    const fit = rows.filter(r => r.fits && r.max_seq_len >= seq);
    const out = pick('pick-answer');
    if (!fit.length) {
      out.innerHTML = '<p class="verdict-none">Nothing fits ' + esc(model) + ' on ' + article(card) + card + ' GB card at ' +
        seq.toLocaleString('en-US') + ' tokens (predicted). Try a shorter sequence, a larger card, or ' +
        '<a href="#gpus">several GPUs</a>.</p>';
      return;
    }
    // the memory at the picked length, micro-batch 1: measured where a run was, else predicted; a table without
    // it gives the reference shape's
    const at = r => r.measured_at[seq] || (r.memory_at[seq] === undefined ? null : {
      bytes: r.memory_at[seq], kind: 'predicted', how: r.solve,
      what: 'the card must hold this at sequence ' + seq.toLocaleString('en-US') + ' x micro-batch 1, the caching ' +
            'allocator and the CUDA context included (analytic prediction)'});
    const atSeq = fit.every(r => at(r));
    const memory = r => (atSeq ? at(r) : r.memory);
    // the longest sequence first, then the least memory, as the column shows it; answer.picker_order is this key in
    // Python (the summary table's longest recipe): change both together
    fit.sort((a, b) => (b.max_seq_len - a.max_seq_len) || ((memory(a).bytes || 0) - (memory(b).bytes || 0)));
    let body = '';
    for (const r of fit) {
      const speed = r.speed ? (r.speed.bound ? '\u2264 ' : '') + Math.round(r.speed.tokens_per_s).toLocaleString('en-US') +
        mark(r.speed.kind, r.speed.what, r.speed.how) : '\u2013';
      const longest = r.max_seq_len.toLocaleString('en-US') + (r.limited_by === 'context' ? ' (model context)' : '');
      const term = document.getElementById('g-' + r.experiment) ? '#g-' + r.experiment : null;
      const name = term ? '<a class="term" href="' + term + '">' + esc(r.recipe) + '</a>' : esc(r.recipe);
      body += '<tr><td class="recipe">' + name + '</td><td class="num">' + gb(memory(r).bytes) +
        mark(memory(r).kind, memory(r).what, memory(r).how) + '</td><td class="num">' + longest +
        mark('predicted', r.longest_what, r.solve) +
        '</td><td class="num">' + speed + '</td></tr>';
    }
    // a recipe that fits a shorter length says how long; one that fits none, what it needs at the reference shape
    const left = rows.filter(r => !fit.includes(r)).map(r => esc(r.recipe) + ' (' + (r.fits ?
      'up to ' + r.max_seq_len.toLocaleString('en-US') + ' tokens, predicted' :
      gb(r.memory.bytes) + ' ' + r.memory.kind + ' at ' + data.reference[0] + ' x ' + data.reference[1]) + ')');
    out.innerHTML = '<p class="verdict-some">' + fit.length + ' of ' + rows.length + ' recipes fit ' + esc(model) +
      ' on ' + article(card) + card + ' GB card at ' + seq.toLocaleString('en-US') + ' tokens or more:</p>' +
      '<table class="picked"><thead><tr><th>Recipe</th><th>Memory at ' +
      (atSeq ? seq.toLocaleString('en-US') + ' x 1' : data.reference[0] + ' x ' + data.reference[1]) +
      '</th><th>Longest sequence</th><th>Tokens/s, upper bound' +
      (data.gpus && data.gpus[card] ? ' (' + esc(data.gpus[card]) + ')' : '') + '</th></tr></thead><tbody>' + body +
      '</tbody></table>' + (left.length ? '<p class="detail">Do not fit: ' + left.join(', ') + '.</p>' : '');
  }
  for (const id of ['pick-model', 'pick-card', 'pick-seq']) pick(id).addEventListener('change', show);
  show();
})();
"""


def _options(values, chosen, label=str) -> str:
    return "".join(f'<option value="{html.escape(str(v))}"{" selected" if v == chosen else ""}>'
                   f"{html.escape(label(v))}</option>" for v in values)


def picker_html(data: dict, model: str | None = None, card: int | None = None) -> str:
    """The picker: three <select>s, the answer below them, the data as JSON in the page."""
    model = model if model in data["models"] else data["models"][0]
    card = card if card in data["cards"] else data["cards"][0]
    payload = json.dumps(data, sort_keys=True, separators=(",", ":")).replace("</", "<\\/")
    return (
        '<div class="picker"><label>Model <select id="pick-model">' + _options(data["models"], model) +
        '</select></label> <label>Card <select id="pick-card">' +
        _options(data["cards"], card, lambda gb: f"{gb} GB") +
        '</select></label> <label>Sequence of at least <select id="pick-seq">' +
        _options(data["seq_choices"], data["seq_choices"][0], lambda n: f"{n:,} tokens") +
        '</select></label><div id="pick-answer"><p>The answer needs JavaScript; the tables below give the same '
        'figures.</p></div></div>'
        f'<script type="application/json" id="answer-data">{payload}</script>'
        f"<script>{PICKER_SCRIPT}</script>")
