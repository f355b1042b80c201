"""On top of the report: what measured and what predicted — device, driver, torch, transformers, peft,
bitsandbytes — and where the predictions came from other library versions than the GPU runs."""

from __future__ import annotations

from harness.report.load import Results, is_gpu_record
from harness.report.tables import Cell, Table

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")  # the libraries whose version moves a figure


def _versions(versions: dict | None) -> tuple[str, ...]:
    return tuple(str((versions or {}).get(name) or "?") for name in LIBRARIES)


def measurement_environments(results: Results) -> dict[tuple, int]:
    """(device, driver, CUDA, *library versions) -> number of GPU run records."""
    found: dict[tuple, int] = {}
    for record in results.records + results.engine_records:
        if not is_gpu_record(record) or not record.get("environment"):
            continue
        environment = record["environment"]
        key = (environment.get("device_name") or "?", str(environment.get("driver") or "?"),
               str(environment.get("cuda") or "?")) + _versions(environment.get("versions"))
        found[key] = found.get(key, 0) + 1
    return found


def prediction_environments(results: Results) -> dict[tuple, dict[str, int]]:
    """Library versions -> {predictor code digest: prediction files} (the fit tables counted too)."""
    found: dict[tuple, dict[str, int]] = {}
    for prediction in results.predictions + [t for t in (results.fits, results.gpus) if t]:
        digests = found.setdefault(_versions(prediction.get("versions")), {})
        digest = str(prediction.get("predictor") or "?")
        digests[digest] = digests.get(digest, 0) + 1
    return found


def environment_table(results: Results) -> Table | None:
    measured, predicted = measurement_environments(results), prediction_environments(results)
    if not measured and not predicted:
        return None
    lines = []
    for key, count in sorted(measured.items()):
        device, driver, cuda, *versions = key
        lines.append([Cell("measured"), Cell(device, f"driver {driver}, CUDA {cuda}")]
                     + [Cell(v) for v in versions] + [Cell(f"{count} GPU runs")])
    for versions, digests in sorted(predicted.items()):
        codes = ", ".join(f"{digest} ({n})" for digest, n in sorted(digests.items(), key=lambda item: -item[1]))
        lines.append([Cell("predicted", "on a CPU, the CUDA code path"),
                      Cell("no GPU: analytic formula and fake-tensor simulation", f"predictor code {codes}")]
                     + [Cell(v) for v in versions] + [Cell(f"{sum(digests.values())} prediction files")])
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
        for key, count in sorted(measured.items(), key=lambda item: -item[1]):
            device, driver, cuda, *versions = key
            devices.append(f"{device} (driver {driver}, CUDA {cuda}; "
                           + ", ".join(f"{name} {v}" for name, v in zip(LIBRARIES, versions))
                           + f"; {count} runs, the lab's loop and Trainer's)")
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
