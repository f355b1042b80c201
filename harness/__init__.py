"""A benchmark lab for fine-tuning language models under limited VRAM.

    import harness
    runs = harness.load_results("results")                     # every run of the lab's loop, one row each
    predictions = harness.load_results("results", "predictions")
    engine_runs = harness.load_results("results", "engine_runs")  # the same cells in Trainer, SFTTrainer

The package's folders are its three kinds of evidence and what serves them: `step/` builds
and runs a training step, `engines/` the training loops it runs in (the lab's own,
transformers' Trainer, TRL's SFTTrainer), `measure/` measures it, `predict/` predicts it (analytic and
simulated), `report/` renders what was measured and predicted, and `lab/` holds the lab's
commands (the matrix, probes, the pretrained base, micro-benchmarks). `blocks/` holds what the
lab knows of each building block (optimizers, adapters, training blocks), one descriptor each;
`schema` is the record format, `env` the door to the machine, `config` and `techniques` what an
experiment file may say.
"""

from __future__ import annotations

import logging
from pathlib import Path

# torchao (an optional optimizer library, which peft imports whenever it is installed) warns on
# every import that its GPU-only extensions do not load on a machine without that GPU, and its
# registration of two enums makes torch warn of a deprecation: noise in every run's log.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def load_results(path: str | Path = "results", what: str = "runs"):
    """Every record under a results folder as one pandas DataFrame: `runs` (one row per
    configuration, its newest record; memory by category in peak_*/persistent_* columns,
    throughput, loss, status), `engine_runs` (the runs measured in transformers' Trainer or TRL's
    SFTTrainer instead of the lab's own loop, one row each) or `predictions` (one row per prediction)."""
    from harness.report.load import load_results as load
    from harness.report.load import predictions_frame, runs_frame

    frames = {"runs": runs_frame, "predictions": predictions_frame,
              "engine_runs": lambda results: runs_frame(results, engines=True)}
    if what not in frames:
        raise ValueError(f"load_results: what={what!r}; one of {', '.join(frames)}")
    return frames[what](load(path))
