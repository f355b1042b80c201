"""What a run measures while an engine trains: load, phases, timed steps, the tracked step, held-out loss.

An engine (harness.engines) owns the training loop; it calls these hooks at the same points of
every step, whichever loop it is: `begin_step` before the step's first forward, `switch` (or
`phase`) at forward, backward and the optimizer step, `after_backward` when the step's gradients
are complete, `end_step` after the optimizer step, and `record_loss` with the step's loss. So the
lab's loop, Trainer and SFTTrainer are measured by one piece of code.

Steps 0 .. warmup-1 are warm-up (untimed), then the timed steps, then one tracked step whose
tensors are counted by category (untimed, because counting slows every operator).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from harness.measure.memory import (
    CudaMeter,
    TensorTracker,
    fsdp2_tracking,
    label_gradients,
    label_model,
    tracker_phase,
)
from harness.step.train import Progress, evaluate
from harness.step.zero import ZeroStep


@dataclass
class Session:
    cfg: object                          # the Experiment
    autocast: str                        # the technique's, for held-out evaluation
    device: torch.device
    tracker: TensorTracker | None        # CPU: the memory meter (with the budget's cap)
    cuda_meter: CudaMeter | None
    held_out: torch.Tensor | None
    progress: Progress = field(default_factory=Progress)
    times: list[float] = field(default_factory=list)
    load_seconds: float = 0.0
    model: object = None                 # the trained model, once built
    _phase: object = None                # the open phase context
    _tracking: ExitStack | None = None   # the tracker's contexts, entered for this step
    _in_step: bool = False               # phases exist only inside a step (not in held-out evaluation)
    _started: float = 0.0

    @property
    def tracked_step(self) -> int:
        """The index of the last step, the tracked one (warm-up and timed steps come before it)."""
        return self.cfg.warmup_steps + self.cfg.steps

    @property
    def steps_in_all(self) -> int:
        return self.tracked_step + 1

    @property
    def _budget_binds(self) -> bool:  # on CPU a budget binds only where the tracker counts every step
        return self.device.type == "cpu" and self.tracker is not None and self.tracker.cap_bytes is not None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def loading(self):
        """Building the model (and whatever the engine builds with it)."""
        started = time.perf_counter()
        with (self.tracker or nullcontext()), (self.cuda_meter.phase("load") if self.cuda_meter else nullcontext()):
            yield
        self.load_seconds = time.perf_counter() - started

    def loaded(self, model) -> None:
        self.model = model
        if self.held_out is not None:
            self.evaluate_held_out(0)

    def begin_step(self, step: int, model, optimizer) -> None:
        self.progress.step = step
        if step == self.tracked_step:
            self.tracker = self.tracker or TensorTracker(device_type=self.device.type)
            self._start_tracking()
            label_model(self.tracker, model, optimizer)
            for category, tensors in (optimizer.partitions() if isinstance(optimizer, ZeroStep) else {}).items():
                self.tracker.track(tensors, category)  # a ZeRO engine's flat partitions, which no parameter shows
            self.tracker.reset_peak()
        elif self._budget_binds:
            self._start_tracking()
        self._in_step = True
        self._sync()
        self._started = time.perf_counter()

    def switch(self, phase: str | None) -> None:
        """Close the open phase and open `phase` (None: none), for loops that have no block per phase."""
        if self._phase is not None:
            self._phase.__exit__(None, None, None)
            self._phase = None
        if phase is None or not self._in_step:
            return
        self.progress.phase = phase
        if self._tracking is not None:
            self._phase = tracker_phase(self.tracker, phase)
        elif self.cuda_meter is not None:
            self._phase = self.cuda_meter.phase(phase)
        else:
            return
        self._phase.__enter__()

    @contextmanager
    def phase(self, name: str):
        self.switch(name)
        try:
            yield
        finally:
            self.switch(None)

    def after_backward(self, model) -> None:
        if self.progress.step == self.tracked_step:
            label_gradients(self.tracker, model)

    def end_step(self, step: int) -> None:
        self.switch(None)
        self._in_step = False
        self._sync()
        elapsed = time.perf_counter() - self._started
        self._stop_tracking()
        if step == self.tracked_step:
            return  # its held-out loss comes after the peaks are read (the worker's)
        if step >= self.cfg.warmup_steps:
            self.times.append(elapsed)
        if self.held_out is not None and (step + 1) % self.cfg.eval_every == 0:
            self.evaluate_held_out(step + 1)

    def close(self) -> None:
        """Leave the open phase and the tracker, as a `with` block would: a step that raised (an
        out-of-memory past a budget) never reached end_step."""
        self.switch(None)
        self._in_step = False
        self._stop_tracking()

    def _start_tracking(self) -> None:
        """The one place a step starts being counted: what must be entered with the tracker goes here."""
        self._tracking = ExitStack()
        if self.cfg.sharding == "fsdp2":  # what FSDP2 frees and gathers outside the dispatcher
            self._tracking.enter_context(fsdp2_tracking(self.tracker))
        self._tracking.enter_context(self.tracker)

    def _stop_tracking(self) -> None:
        if self._tracking is not None:
            self._tracking.close()
            self._tracking = None

    def record_loss(self, loss: float) -> None:
        self.progress.losses.append(loss)

    def evaluate_held_out(self, steps_done: int) -> None:  # between steps, never inside a timed one
        loss = evaluate(self.model, self.held_out, self.autocast, self.cfg.micro_batch)
        self.progress.evaluations.append({"step": steps_done, "loss": loss})
