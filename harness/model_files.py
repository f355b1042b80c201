"""A model's config.json read as data: what validation and the model builders both ask of one, and nothing
of the model's own code runs."""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import ConfigError


def read_model_config(path: Path, source) -> dict:
    """A config.json's fields: a JSON object with a model_type, or a ConfigError naming `source`'s model field."""
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(source, "model", f"no {path}: a folder without a config.json holds no model") from None
    except (OSError, ValueError, RecursionError) as error:
        raise ConfigError(source, "model", f"{path} is not a readable JSON config ({error})") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("model_type"), str):
        raise ConfigError(source, "model", f"{path} names no model_type (a config.json is a JSON object with one)")
    return settings
