"""Engines: the training loops a run can be measured in, a registry by name.

`harness` is the lab's own lean loop (harness.step.train); `trainer` is transformers' Trainer
with TrainingArguments mapped from the experiment; `trl-sft` is TRL's SFTTrainer on the same
model and sequences, packing on. Each is one function `train(run) -> dict` that builds the model
under `run.session.loading()`, trains `run.session.steps_in_all` optimizer steps calling the
session's hooks (harness.measure.session), and returns what the record says of the engine. So
every engine is measured by the same meters on the same batches in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class EngineRun:
    """What an engine gets: the experiment, its resolved technique, the model source, the batches
    and tokenizer of harness.step.data, the device, and the session that measures it."""
    cfg: object
    technique: object
    source: object
    batches: object
    tokenizer: object
    device: object
    session: object


def _lab(run: EngineRun) -> dict:
    from harness.engines.lab import train

    return train(run)


def _trainer(run: EngineRun) -> dict:
    from harness.engines.trainer import train

    return train(run)


def _trl_sft(run: EngineRun) -> dict:
    from harness.engines.sft import train

    return train(run)


ENGINES: dict[str, Callable[[EngineRun], dict]] = {"harness": _lab, "trainer": _trainer, "trl-sft": _trl_sft}
