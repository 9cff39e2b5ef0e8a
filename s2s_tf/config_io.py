"""Run configs: each setting declared once, and written and read as JSON beside a run.

Config dataclasses declare their user-facing settings with `setting(default,
help, ...)`: the default, the help text, the flag name and the checks live in
that one place. `s2s_tf.flags.config_flags` turns those declarations into absl
flags and parsed flags back into configs, so flags, configs and presets share
them.

A run's folder holds `config.json`, so the run can be repeated from its own
output; `load_config` rebuilds the dataclass, nested dataclasses included.
"""

import dataclasses
import json
import os
import typing
from collections.abc import Callable
from typing import Any

SETTING_KEY = "s2s_tf.setting"


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one config field is offered to users (as a flag, in presets).

    Attributes:
      help: one line of help.
      flag: the flag name (default: the field name).
      choices: allowed values, or a callable returning them (a registry read
        lazily); the flag becomes an enum (or a list of choices for tuples).
      lower_bound: the smallest allowed number.
      upper_bound: the largest allowed number.
      parse: text -> value, for values a plain flag type cannot hold (e.g.
        "32,48" -> (32, 48)); raises ValueError naming the problem.
      unparse: value -> text, the inverse of `parse` (for the flag's default).
      check: value -> None, raises ValueError naming the problem.
      kind: "int", "float", "bool", "str" or "list": the flag type when the
        default does not tell (e.g. a None default).
    """

    help: str
    flag: str | None = None
    choices: Any = None
    lower_bound: float | None = None
    upper_bound: float | None = None
    parse: Callable[[str], Any] | None = None
    unparse: Callable[[Any], str] | None = None
    check: Callable[[Any], None] | None = None
    kind: str | None = None


def setting(default, help, **options):  # noqa: A002 (the absl name)
    """A dataclass field with its user-facing declaration (`Setting`'s options)."""
    return dataclasses.field(default=default, metadata={SETTING_KEY: Setting(help, **options)})


def check_positive(value):
    """A `Setting.check`: raises ValueError unless `value` > 0."""
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")


def settings(cls):
    """(field, `Setting`) pairs of the declared settings of dataclass `cls`, in field order."""
    return [
        (f, f.metadata[SETTING_KEY]) for f in dataclasses.fields(cls) if SETTING_KEY in f.metadata
    ]


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
    """Converts a JSON value back into `field_type` (dataclasses and tuples).

    An optional dataclass (`DataConfig | None`) is rebuilt from a dict like a plain one.
    """
    if isinstance(value, dict):
        options = typing.get_args(field_type) or (field_type,)
        classes = [t for t in options if dataclasses.is_dataclass(t)]
        if len(classes) == 1:
            return config_from_dict(classes[0], value)
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


# Text forms of settings that a plain flag type cannot hold. Errors name the setting;
# the flags helper prefixes the flag name.

STAGE_SEPARATOR = ";"


def parse_int_list(text, name="value"):
    """Parses "2,3" into (2, 3); ValueError naming `name` unless all are positive ints."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{name} must hold positive integers, got {text!r}")
    return values


def parse_image_size(text):
    """Parses "32" or "32,48" into (height, width)."""
    size = parse_int_list(text, "image_size")
    if len(size) not in (1, 2):
        raise ValueError(f"--image_size must be 'S' or 'H,W', got {text!r}")
    return size * 2 if len(size) == 1 else size


def unparse_image_size(size):
    """(32, 32) -> "32"; (32, 48) -> "32,48"."""
    return str(size[0]) if size[0] == size[1] else f"{size[0]},{size[1]}"


def parse_stage_widths(text):
    """Parses "64,64;128,128" into ((64, 64), (128, 128)) (stages split by ';')."""
    return tuple(parse_int_list(stage, "ae_stage_widths") for stage in text.split(STAGE_SEPARATOR))


def unparse_stage_widths(widths):
    """((64, 64), (128,)) -> "64,64;128"."""
    return STAGE_SEPARATOR.join(",".join(str(w) for w in stage) for stage in widths)


def parse_count(text, name="num_examples"):
    """Parses a positive count, or "all" (None: no limit)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--{name} must be a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise ValueError(f"--{name} must be a positive integer or 'all', got {text!r}")
    return value


def unparse_count(value):
    """None -> "all"; 500 -> "500"."""
    return "all" if value is None else str(value)


def parse_eps_list(text):
    """Parses "2/255,4/255,0.03" into floats in [0, 1] (pixel units).

    Raises:
      ValueError: naming --eps for an item that is not a number or a fraction a/b in [0, 1].
    """
    values = []
    for item in str(text).split(","):
        try:
            num, _, den = item.strip().partition("/")
            value = float(num) / (float(den) if den else 1.0)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"--eps items must be numbers or fractions like 8/255, got {item!r}"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--eps values are in [0, 1] pixel units, got {item!r}")
        values.append(value)
    return tuple(values)


def unparse_eps_list(values):
    """(2/255, 0.5) -> "2/255,0.5": multiples of 1/255 are written as fractions."""
    items = []
    for value in values:
        scaled = value * 255
        items.append(f"{round(scaled):d}/255" if abs(scaled - round(scaled)) < 1e-6 else f"{value}")
    return ",".join(items)


def parse_named_paths(text):
    """Parses "vgg=/a.keras,lenet=/b.keras" into (("vgg", "/a.keras"), ...)."""
    pairs = []
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--transfer_classifiers items must be name=path, got {item!r}")
        pairs.append((name, path))
    return tuple(pairs)


def unparse_named_paths(pairs):
    """(("vgg", "/a.keras"),) -> "vgg=/a.keras"."""
    return ",".join(f"{name}={path}" for name, path in pairs)
