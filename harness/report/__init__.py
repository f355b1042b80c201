"""The report: reads results/ (run records, predictions, probes, micro-benchmarks, base
pretraining records) and renders reports/index.md and reports/index.html with the claims
ledger, figures and tables.

Imports no torch and none of the code that runs experiments; it only reads JSON.
Modules: load (files -> records and frames), evidence (quantities per claim of
harness/claims.py's two ledgers), verdicts (numbers -> verdict), ledger (rows), loss (loss
parity on a pretrained base), answer (the first screen: what fits a card, and its picker), environment
(what measured and what predicted), glossary, fits, ladder, figures, tables, render, browser. Importing this package itself is cheap: the
command line takes its arguments from here.
"""

from pathlib import Path

from harness.arguments import existing_folder


def add_arguments(parser) -> None:
    parser.add_argument("--results", type=existing_folder, default=Path("results"),
                        help="results folder (default: results)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
