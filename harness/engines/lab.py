"""The lab's own loop: forward, backward, optimizer, one explicit step at a time (harness.step.train)."""

from __future__ import annotations

from harness.step.train import build_training, saved_tensors_context, train_step


def train(run) -> dict:
    session, device = run.session, run.device
    with session.loading():
        model, optimizer, scaler = build_training(run.source, run.technique, run.cfg, device)
    session.loaded(model)
    saved_tensors = saved_tensors_context(model, run.cfg)
    for step in range(session.steps_in_all):
        micro_batches = run.batches.step(step, device)
        session.begin_step(step, model, optimizer)
        loss = train_step(model, optimizer, micro_batches, run.technique.autocast, scaler, session.progress,
                          session.phase, after_backward=lambda: session.after_backward(model),
                          saved_tensors=saved_tensors)
        session.end_step(step)
        session.record_loss(float(loss))
    return {"name": "harness"}
