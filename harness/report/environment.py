"""On top of the report: what measured and what predicted — device, driver, torch, transformers, peft,
bitsandbytes — and where the predictions came from other library versions than the GPU runs."""

from __future__ import annotations

from harness.report.load import LAB_ENGINE, Results, count_predictions, engine_of, is_gpu_record
from harness.report.tables import Cell, Table
from harness.report.units import fmt_counted, fmt_counts, fmt_version

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")  # the libraries whose version moves a figure
LAB_LOOP = "the lab's loop"


def _versions(versions: dict | None) -> tuple[str, ...]:
    return tuple(fmt_version(versions, name) for name in LIBRARIES)


def _loop(record: dict) -> str:
    engine = engine_of(record)
    return LAB_LOOP if engine == LAB_ENGINE else f"the {engine} engine"


def measurement_environments(results: Results) -> dict[tuple, dict[str, int]]:
    """(device, driver, CUDA, *library versions) -> {training loop: number of GPU run records}."""
    found: dict[tuple, dict[str, int]] = {}
    for record in results.records + results.engine_records:
        if not is_gpu_record(record) or not record.get("environment"):
            continue
        environment = record["environment"]
        key = (environment.get("device_name") or "?", str(environment.get("driver") or "?"),
               str(environment.get("cuda") or "?")) + _versions(environment.get("versions"))
        loops = found.setdefault(key, {})
        loops[_loop(record)] = loops.get(_loop(record), 0) + 1
    return found


def runs_words(loops: dict[str, int], noun: str = "run") -> str:
    """'44 runs: 41 in the lab's loop, 3 in the trainer engine' (the lab's loop first), so that a count that
    takes in other loops says so, beside the tables that count the lab's loop alone."""
    total = fmt_counted(sum(loops.values()), noun)
    ordered = sorted(loops.items(), key=lambda item: (item[0] != LAB_LOOP, item[0]))
    if len(ordered) == 1:
        return f"{total}, in {ordered[0][0]}"
    return f"{total}: " + ", ".join(f"{n} in {loop}" for loop, n in ordered)


def _versions_of(prediction: dict) -> tuple[str, ...]:
    return _versions(prediction.get("versions"))


def prediction_environments(results: Results) -> dict[tuple, dict[str, int]]:
    """Library versions -> {predictor code digest: files of predictions, of every kind}."""
    return count_predictions(results, _versions_of, lambda _, prediction: str(prediction.get("predictor") or "?"))


def prediction_kinds(results: Results) -> dict[tuple, dict[str, int]]:
    """Library versions -> {kind of prediction: files}, for counts that say what they count."""
    return count_predictions(results, _versions_of)


def environment_table(results: Results) -> Table | None:
    measured, predicted = measurement_environments(results), prediction_environments(results)
    if not measured and not predicted:
        return None
    lines = []
    for key, loops in sorted(measured.items()):
        device, driver, cuda, *versions = key
        lines.append([Cell("measured"), Cell(device, f"driver {driver}, CUDA {cuda}")]
                     + [Cell(v) for v in versions] + [Cell(runs_words(loops, "GPU run"))])
    kinds = prediction_kinds(results)
    for versions, digests in sorted(predicted.items()):
        codes = ", ".join(f"{digest} ({n})" for digest, n in sorted(digests.items(), key=lambda item: -item[1]))
        lines.append([Cell("predicted", "on a CPU, the CUDA code path"),
                      Cell("no GPU: analytic formula and fake-tensor simulation", f"predictor code {codes}")]
                     + [Cell(v) for v in versions] + [Cell(fmt_counts(kinds[versions]))])
    return Table(["", "Device"] + list(LIBRARIES) + ["Files"], lines, css="environment")


def version_mismatches(results: Results) -> list[str]:
    """Libraries whose versions differ between the GPU runs and the predictions, in words."""
    measured = {key[3:] for key in measurement_environments(results)}
    predicted = set(prediction_environments(results))
    if not measured or not predicted:
        return []
    words = []
    for index, name in enumerate(LIBRARIES):
        runs = sorted({v[index] for v in measured})
        predictions = sorted({v[index] for v in predicted})
        if runs != predictions:
            words.append(f"{name} {', '.join(predictions)} for the predictions against {', '.join(runs)} on the GPU")
    return words


def environment_text(results: Results) -> str:
    mismatches = version_mismatches(results)
    if not mismatches:
        return ("The predictions and the GPU runs used the same versions of " + ", ".join(LIBRARIES) + "."
                if measurement_environments(results) and prediction_environments(results) else "")
    return ("The predictions were made with other library versions than the GPU runs measured with ("
            + "; ".join(mismatches) + "): where a library changed how it allocates, a prediction and a "
            "measurement differ for that reason too. Predictions are made on a CPU and model the CUDA code path.")



def summary_line(results: Results) -> str:
    """One sentence for the top of the page: what measured, what predicted, whether their versions agree."""
    measured, predicted = measurement_environments(results), prediction_environments(results)
    parts = []
    if measured:
        devices = []
        for key, loops in sorted(measured.items(), key=lambda item: -sum(item[1].values())):
            device, driver, cuda, *versions = key
            devices.append(f"{device} (driver {driver}, CUDA {cuda}; "
                           + ", ".join(f"{name} {v}" for name, v in zip(LIBRARIES, versions))
                           + f"; {runs_words(loops)})")
        parts.append("Measured on " + "; ".join(devices))
        unrecorded = sum(1 for r in results.records + results.engine_records
                         if is_gpu_record(r) and not r.get("environment"))
        if unrecorded:
            parts[-1] += (f", and {unrecorded} more GPU run{'s' if unrecorded > 1 else ''} that stopped before "
                          "recording its environment")
    else:
        parts.append("Nothing measured on a GPU")
    if predicted:
        versions = [", ".join(f"{name} {v}" for name, v in zip(LIBRARIES, key)) for key in sorted(predicted)]
        parts.append("predicted without a GPU with " + " or ".join(versions))
    text = "; ".join(parts) + "."
    if version_mismatches(results):
        text += (' The predictions used other library versions than the GPU runs (the table "Measured and predicted '
                 'with" below says which).')
    return text
