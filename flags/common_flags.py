"""Flags shared by the s2s_tf binaries: data, models and the output directory.

The data and model flags come from the settings the library's configs declare
(`s2s_tf.config_io.setting`), through `config_flags`: each setting's name,
default and help are written once, in its config. What is left here are the
checks that span several flags. Validators run at parse time, so a bad value
fails before any work starts; library code never reads flags.
"""

from absl import app
from absl import flags
from absl import logging

from s2s_tf import config_io
from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf.flags import config_flags
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.train import distribute
from s2s_tf.train import stages


def define_workdir_flag(required=True):
    """Defines --workdir, where a run writes its config, checkpoints and outputs."""
    flags.DEFINE_string(
        "workdir", None, "Directory for this run's config, checkpoints and outputs."
    )
    if required:
        flags.mark_flag_as_required("workdir")


def define_strategy_flags(choices=constants.STRATEGIES):
    """Defines --strategy and --num_cpu_devices (logical CPU replicas for tests)."""
    flags.DEFINE_enum(
        "strategy",
        "mirrored",
        choices,
        "mirrored: all local GPUs (else CPU); multi_worker: from TF_CONFIG; one_device.",
    )
    flags.DEFINE_integer(
        "num_cpu_devices",
        0,
        "Split the CPU into N logical devices (test replicas without GPUs); 0: off.",
        lower_bound=0,
    )


def strategy_from_flags(flag_values=None):
    """The `tf.distribute` strategy of --strategy, checked against --batch_size.

    Devices and collectives are configured here, before TensorFlow runs its first op.

    Raises:
      app.UsageError: naming --batch_size when replicas cannot share it evenly.
    """
    values = flag_values or flags.FLAGS
    distribute.split_cpu(values.num_cpu_devices)
    strategy = distribute.create_strategy(values.strategy)
    try:
        distribute.check_global_batch(values.batch_size, strategy)
    except ValueError as e:
        raise app.UsageError(f"--batch_size={values.batch_size}: {e}") from None
    logging.info("strategy %s with %d replicas", values.strategy, strategy.num_replicas_in_sync)
    return strategy


def define_data_flags(defaults=None):
    """Defines the data flags (`data.DataConfig`'s settings).

    Args:
      defaults: a `DataConfig` whose values are the defaults (a binary's own).
    """
    config_flags.define(data_lib.DataConfig, defaults=defaults)
    flags.register_validator(
        "image_folder",
        lambda v: v is not None or flags.FLAGS.dataset != "folder",
        message="--dataset=folder needs --image_folder",
    )


def data_config_kwargs(flag_values=None):
    """The `data.DataConfig` fields that `define_data_flags` sets, as keyword arguments.

    Binaries add what is theirs (split, augmentation, example limit):
    `data.DataConfig(**data_config_kwargs(), split="test")`.
    """
    return config_flags.values(data_lib.DataConfig, flag_values=flag_values or flags.FLAGS)


def define_model_flags():
    """Defines the classifier and autoencoder flags (`ModelConfig`, `AutoencoderConfig`)."""
    config_flags.define(stages.ModelConfig)
    define_autoencoder_flags(stages.ModelConfig().autoencoder)


def define_autoencoder_flags(defaults, names=None):
    """Defines the autoencoder flags, with `defaults` (an `AutoencoderConfig`)."""
    names = config_flags.define(ae_lib.AutoencoderConfig, names, defaults=defaults)
    if "num_stages" not in names:
        return

    @flags.multi_flags_validator(
        ["ae_stage_widths", "ae_stages"],
        message="--ae_stages exceeds the number of stages in --ae_stage_widths",
    )
    def _check_stages(values):
        try:
            widths = config_io.parse_stage_widths(values["ae_stage_widths"])
            return values["ae_stages"] <= len(widths)
        except ValueError:
            return True  # reported by the --ae_stage_widths validator


def model_config_kwargs(flag_values=None):
    """`stages.ModelConfig` keyword arguments from the model flags (autoencoder included)."""
    values = flag_values or flags.FLAGS
    return {
        **config_flags.values(stages.ModelConfig, flag_values=values),
        "autoencoder": ae_lib.AutoencoderConfig(
            **config_flags.values(ae_lib.AutoencoderConfig, flag_values=values)
        ),
    }
