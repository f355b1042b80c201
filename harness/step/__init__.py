"""What builds and runs a training step: model sources and building (models), the lab's
pretrained base (checkpoint), data (data) and the step itself (train)."""
