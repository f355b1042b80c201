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


@dataclass(frozen=True)
class Engine:
    train: Callable[[EngineRun], dict]
    summary: str
    package: str | None = None  # the module it imports that a machine may lack: without it a run is skipped


ENGINES: dict[str, Engine] = {
    "harness": Engine(_lab, "the lab's own loop (harness.step.train)"),
    "trainer": Engine(_trainer, "transformers' Trainer, TrainingArguments mapped from the experiment"),
    "trl-sft": Engine(_trl_sft, "TRL's SFTTrainer on the same model and sequences, packing on", package="trl"),
}


def engine_help() -> str:
    """Each engine and what it is, for a command line's help."""
    return "; ".join(f"{name}: {engine.summary}" for name, engine in ENGINES.items())
