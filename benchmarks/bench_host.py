"""The host's time per kernel it launches: a training pass (forward and backward, no optimizer) of a Llama
model so narrow (the `tiny-llama` preset: 4 layers, hidden 256; 2 x 16 tokens) that its kernels take the device
next to nothing, so the pass takes what the host takes to issue them: Python, the modules' calls and the
dispatcher in forward, the autograd engine in backward.

The forms are the lab's own steps, built by its builders from its experiment files: `bare` (bf16-pure: bf16
weights that all train), `lora` (a frozen bf16 base with peft's LoRA on all seven projections, under bf16
autocast), `lora-gc` (the same, checkpointed: each layer's forward runs again in backward, under
torch.utils.checkpoint's saved-tensor hooks) and `qlora` (an NF4 base: bitsandbytes' 4-bit layers, whose custom
ops dispatch through Python). Each records the kernels the speed model counts for its pass (the same pass
traced under the simulation's fake CUDA step, harness.predict.simulate.fake_step, by the lab's kernel recorder),
forward and backward apart, in extra_info: a pass's time over its kernels is a host cost per kernel for steps of
each kind, and the forms together part the forward's cost from the backward's. The speed model's host cost
today is one figure from bench_lora_forward_backward (the adapter's kernels: harness.predict.speed), which the
H200 runs show too high for plain modules (bf16 TinyLlama at 512 x 4, launch-bound, predicted about 20% slow)
and too low for checkpointed and 4-bit steps (QLoRA with checkpointing at 7B and 512 tokens about 20% fast).
"""

from pathlib import Path

import pytest
import torch

from harness.config import resolve
from harness.predict.kernels import MARKS, KernelRecorder
from harness.step.models import build_base_model, prepare_for_training, resolve_source

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
MODEL, BATCH, SEQUENCE = "tiny-llama", 2, 16
FORMS = {"bare": ("bf16-pure", False), "lora": ("lora", False), "lora-gc": ("lora", True), "qlora": ("qlora", False)}


def _config(form: str, device_type: str):
    experiment, checkpointing = FORMS[form]
    return resolve(EXPERIMENTS_DIR / f"{experiment}.yaml", {
        "model": MODEL, "seq_len": SEQUENCE, "micro_batch": BATCH, "device": device_type,
        "gradient_checkpointing": checkpointing})


def _model(config, device: torch.device, device_type: str) -> torch.nn.Module:
    technique, cfg = config.technique, config.experiment
    model = build_base_model(resolve_source(MODEL, False, device_type), technique, device, seed=0)
    return prepare_for_training(model, technique, cfg.lora, cfg.gradient_checkpointing).train()


def _pass(model, ids, autocast: str, device_type: str, phase=lambda name: None):
    model.zero_grad(set_to_none=True)
    phase("forward")
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        loss = model(input_ids=ids, labels=ids).loss
    phase("backward")
    loss.backward()
    return loss.detach()


def traced_kernels(form: str) -> dict[str, int]:
    """The kernels the speed model counts for a form's pass, by phase: the pass traced as a CUDA step."""
    from harness.predict.simulate import fake_step

    config = _config(form, "cpu")
    recorder = KernelRecorder()

    def phase(name):
        recorder.phase = name

    with fake_step(config.technique, config.experiment, "cuda"), recorder:
        model = _model(config, torch.device("cpu"), "cuda")
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQUENCE))
        recorder.recording = True
        _pass(model, ids, config.technique.autocast, "cpu", phase)
        recorder.recording = False
    launched = [k for k in recorder.kernels if k.op not in MARKS]
    return {name: sum(k.phase == name for k in launched) for name in ("forward", "backward")}


@pytest.mark.parametrize("form", list(FORMS))
def bench_host_per_kernel(measure, form, device):
    config = _config(form, device.type)
    model = _model(config, device, device.type)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQUENCE), device=device)
    autocast = config.technique.autocast

    def forward_backward():
        return _pass(model, ids, autocast, device.type)

    forward_backward()  # first call: lazy initialisation, not counted
    kernels = traced_kernels(form)
    experiment, checkpointing = FORMS[form]
    out = measure(forward_backward, "host-per-kernel", form == "bare",
                  {"model": MODEL, "batch": BATCH, "sequence": SEQUENCE}, form=form, experiment=experiment,
                  gradient_checkpointing=checkpointing, kernels=kernels["forward"] + kernels["backward"],
                  forward_kernels=kernels["forward"], backward_kernels=kernels["backward"], autocast=autocast,
                  trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert torch.isfinite(out.float()) and kernels["forward"] > 50 and kernels["backward"] > 50
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g.float()).all() for g in grads)
