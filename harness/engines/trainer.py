"""transformers' Trainer as an engine: the experiment as TrainingArguments, measured through callbacks.

The model is the lab's own build (the same weights, bitsandbytes layers and peft adapters);
Trainer enables gradient checkpointing itself, picks the optimizer from `optim`, runs autocast and
loss scaling through accelerate, and feeds the sequences of harness.step.data in order. A
callback and two forward hooks on the model tell the session where each step and phase begins.
"""

from __future__ import annotations

import dataclasses
import tempfile

import torch

from harness.blocks.optimizers import OPTIMIZERS
from harness.blocks.parts import BuiltForTrainer
from harness.engines.arguments import NotMapped, arguments_class, mapped_arguments
from harness.step.data import sequence_batch
from harness.step.models import build_base_model, prepare_for_training


class Sequences(torch.utils.data.Dataset):
    """Sequence i of the run's seeded order (harness.step.data), with itself as labels, as the lab's
    loop trains on it: Trainer's sequential sampler gives micro-batch k sequences k*m .. k*m+m-1."""

    def __init__(self, batches, steps: int):
        self.batches = batches
        self.count = steps * batches.micro_batch * batches.grad_accum

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        b = self.batches
        ids = sequence_batch(b.stream, b.seq_len, index, 1, b.seed)[0]
        return {"input_ids": ids, "labels": ids}


def measured_callback(session):
    """A TrainerCallback that calls the session's hooks (a function, so that transformers is imported
    only where an engine runs)."""
    from transformers import TrainerCallback

    class Measured(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # Forward and backward have no callbacks: the model's own hooks mark them (on the
            # outermost module, which checkpointing never runs again).
            model.register_forward_pre_hook(lambda module, inputs: session.switch("forward"))
            model.register_forward_hook(lambda module, inputs, output: session.switch("backward"))

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            session.begin_step(state.global_step, model, optimizer)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            session.after_backward(model)
            session.switch("optimizer")

        def on_step_end(self, args, state, control, **kwargs):
            session.end_step(state.global_step - 1)  # Trainer counts the step before this event

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # every step's (logging_steps: 1), as the mean over its micro-batches
                session.record_loss(float(logs["loss"]))

    return Measured()


def build_model(run):
    """The lab's model for the technique; Trainer turns on gradient checkpointing itself."""
    cfg = run.cfg
    model = build_base_model(run.source, run.technique, run.device, cfg.seed, cfg.attn_implementation,
                             cfg.trust_remote_code)
    return prepare_for_training(model, run.technique, cfg.lora, gradient_checkpointing=False)


def optimizers(run, model) -> tuple:
    """Trainer's `optimizers` argument: an optimizer TrainingArguments cannot name (LoRA+, peft's) is the
    lab's own, handed to Trainer; the others are Trainer's own (TrainingArguments.optim)."""
    optimizer = OPTIMIZERS[run.technique.optimizer]
    if not isinstance(optimizer.trainer, BuiltForTrainer):
        return None, None
    trainable = [p for p in model.parameters() if p.requires_grad]
    return optimizer.build(trainable, run.cfg.optim, run.device.type, model=model), None


def engine_record(name: str, library: str, arguments: dict, notes: list[str], trainer) -> dict:
    """What the record says of the engine: the library, the arguments, the optimizer class the trainer
    built from them (accelerate wraps it), and where its step differs from the lab's."""
    import importlib.metadata

    shown = {k: v for k, v in arguments.items() if k != "output_dir"}
    optimizer = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer))
    return {"name": name, "library": f"{library} {importlib.metadata.version(library)}", "arguments": shown,
            "optimizer": f"{optimizer.__module__}.{optimizer.__qualname__}", "notes": notes}


def check_arguments(engine: str, arguments: dict) -> None:
    known = {f.name for f in dataclasses.fields(arguments_class(engine))}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise NotMapped(f"this version's {arguments_class(engine).__name__} has no field {', '.join(unknown)}")


def train(run) -> dict:
    from transformers import Trainer, TrainingArguments

    session = run.session
    with tempfile.TemporaryDirectory() as output_dir:
        arguments, notes = mapped_arguments(run.cfg, run.technique, "trainer", run.device.type, output_dir,
                                            run.source.config)
        check_arguments("trainer", arguments)
        with session.loading():
            model = build_model(run)
            trainer = Trainer(model=model, args=TrainingArguments(**arguments),
                              train_dataset=Sequences(run.batches, session.steps_in_all),
                              optimizers=optimizers(run, model), callbacks=[measured_callback(session)])
        session.loaded(model)
        trainer.train()
    return engine_record("trainer", "transformers", arguments, notes, trainer)
