"""Writes and reads run configs (frozen dataclasses) as JSON beside a run's outputs.

A run's folder holds `config.json`, so the run can be repeated from its own
output; `load_config` rebuilds the dataclass, nested dataclasses included.
"""

import dataclasses
import json
import os
import typing


def config_to_dict(config):
    """Returns a JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def save_config(config, directory, filename="config.json"):
    """Writes `config` as indented JSON to `directory/filename` and returns the path.

    The file is written to a temporary name and renamed, so a crash never leaves
    a truncated config behind.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _from_value(field_type, value):
    """Converts a JSON value back into `field_type` (dataclasses and tuples)."""
    if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
        return config_from_dict(field_type, value)
    if isinstance(value, list):
        return tuple(_from_value(None, v) for v in value)
    return value


def config_from_dict(cls, values):
    """Builds dataclass `cls` from a dict written by `config_to_dict`.

    Raises:
      ValueError: naming the fields the dict has that `cls` does not.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**{k: _from_value(hints.get(k), v) for k, v in values.items()})


def load_config(cls, path):
    """Reads a config of dataclass type `cls` from a JSON file."""
    with open(path, encoding="utf-8") as f:
        return config_from_dict(cls, json.load(f))
