"""The lab's own errors, below every module that raises them (importing this imports nothing)."""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    """A malformed experiment file: names the file and the field at fault."""

    def __init__(self, path: str | Path, field_name: str, message: str):
        self.path, self.field_name, self.message = str(path), field_name, message
        super().__init__(f"{path}: field '{field_name}': {message}")
