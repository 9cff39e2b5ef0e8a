"""absl flags from the configs' `setting` declarations, and configs back from parsed flags.

A config dataclass declares each user-facing setting once, with
`s2s_tf.config_io.setting(default, help, ...)`. `define(cls)` turns those
declarations into absl flags (type, default, help, enum choices, bounds and
parse-time checks, so a bad value fails before any work starts), and
`values(cls)` reads the parsed flags back as the dataclass's keyword arguments:

    config_flags.define(data_lib.DataConfig)              # in define_*_flags()
    data_lib.DataConfig(**config_flags.values(data_lib.DataConfig), split="test")

A binary whose defaults differ (the pipeline works at 28 px) passes a config
instance as `defaults`; the flag names and help stay those of the declaration.
"""

from absl import flags

from s2s_tf import config_io


def _choices(setting):
    choices = setting.choices() if callable(setting.choices) else setting.choices
    if choices is None:
        return None
    # Registries (dicts) are listed sorted; a declared tuple keeps its order.
    return sorted(choices) if isinstance(choices, dict) else list(choices)


def _kind(setting, default):
    if setting.kind:
        return setting.kind
    for kind, python_type in (("bool", bool), ("int", int), ("float", float), ("list", tuple)):
        if isinstance(default, python_type):
            return kind
    return "str"


def _register_check(name, setting, flag_values):
    """Runs the setting's parser and check on the flag's value at parse time."""

    def check(value):
        if value is None:
            return True
        try:
            parsed = setting.parse(value) if setting.parse else value
            if setting.check:
                setting.check(parsed)
        except ValueError as e:
            message = str(e)
            raise flags.ValidationError(
                message if message.startswith(f"--{name}") else f"--{name}: {message}"
            ) from None
        return True

    flags.register_validator(name, check, flag_values=flag_values)


def _define_one(name, default, setting, flag_values):
    kind, choices = _kind(setting, default), _choices(setting)
    kwargs = {"flag_values": flag_values}
    if setting.parse is not None:
        text = None if default is None else (setting.unparse or str)(default)
        flags.DEFINE_string(name, text, setting.help, **kwargs)
    elif kind == "bool":
        flags.DEFINE_bool(name, default, setting.help, **kwargs)
    elif kind == "list":
        flags.DEFINE_list(name, list(default), setting.help, **kwargs)
        if choices is not None:
            flags.register_validator(
                name,
                lambda values: (
                    not (unknown := [v for v in values if v not in choices])
                    or _fail(f"--{name}: unknown {unknown}; choose from {choices}")
                ),
                flag_values=flag_values,
            )
    elif choices is not None:
        flags.DEFINE_enum(name, default, choices, setting.help, **kwargs)
    elif kind in ("int", "float"):
        define = flags.DEFINE_integer if kind == "int" else flags.DEFINE_float
        define(
            name,
            default,
            setting.help,
            lower_bound=setting.lower_bound,
            upper_bound=setting.upper_bound,
            **kwargs,
        )
    else:
        flags.DEFINE_string(name, default, setting.help, **kwargs)
    if setting.parse is not None or setting.check is not None:
        _register_check(name, setting, flag_values)


def _fail(message):
    raise flags.ValidationError(message)


def define(cls, names=None, *, defaults=None, flag_names=None, flag_values=flags.FLAGS):
    """Defines one absl flag per declared setting of dataclass `cls`.

    Args:
      cls: a config dataclass whose fields use `config_io.setting`.
      names: the field names to offer (default: every declared setting).
      defaults: an instance of `cls` whose values are the flags' defaults
        (default: the declared defaults).
      flag_names: field name -> flag name, for a binary that must rename one.
      flag_values: the `FlagValues` to define in.

    Returns:
      A dict field name -> flag name of the flags defined.

    Raises:
      ValueError: if `names` holds a field without a setting declaration.
    """
    defined = {}
    for field, setting in config_io.settings(cls):
        if names is not None and field.name not in names:
            continue
        name = (flag_names or {}).get(field.name) or setting.flag or field.name
        default = field.default if defaults is None else getattr(defaults, field.name)
        _define_one(name, default, setting, flag_values)
        defined[field.name] = name
    missing = sorted(set(names or ()) - set(defined))
    if missing:
        raise ValueError(f"{cls.__name__} declares no settings {missing}")
    return defined


def values(cls, names=None, *, flag_names=None, flag_values=flags.FLAGS, only_given=False):
    """The parsed values of the flags `define(cls, names, ...)` defined, by field name.

    Args:
      cls: the config dataclass.
      names: the field names given to `define` (default: every declared setting).
      flag_names: the renames given to `define`.
      flag_values: the parsed `FlagValues`.
      only_given: return only the flags given on the command line (or in a
        flagfile), e.g. to override a preset with them.

    Returns:
      A dict of keyword arguments of `cls` (tuples for lists, parsed text values).
    """
    result = {}
    for field, setting in config_io.settings(cls):
        if names is not None and field.name not in names:
            continue
        name = (flag_names or {}).get(field.name) or setting.flag or field.name
        if only_given and not flag_values[name].present:
            continue
        value = flag_values[name].value
        if setting.parse is not None and value is not None:
            value = setting.parse(value)
        elif isinstance(value, list):
            value = tuple(value)
        result[field.name] = value
    return result
