"""Flags of the checkpoint converter binary (`s2s_tf.convert_main`).

`define_convert_flags()` defines the checkpoint to read, the `.keras` file to
write and the model options. Paths, suffixes and sizes are checked at parse
time, so a bad command fails before any checkpoint is read.
"""

import os

from absl import flags

from s2s_tf import config_io
from s2s_tf.models import layers as s2s_layers


def _checkpoint_validator(suffixes):
    def check(path):
        if path is None:
            return True
        if not path.lower().endswith(tuple(suffixes)):
            raise flags.ValidationError(
                f"--checkpoint must be a {', '.join(suffixes)} file, got {path}"
            )
        if not os.path.isfile(path):
            raise flags.ValidationError(f"--checkpoint does not exist: {path}")
        return True

    return check


def _check_image_size(text):
    if text is None:
        return True
    try:
        config_io.parse_image_size(text)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def define_convert_flags(checkpoint_suffixes, flag_values=flags.FLAGS):
    """Defines every flag of the converter binary.

    Args:
      checkpoint_suffixes: the file types the converter reads (e.g. ".pth", ".npz").
      flag_values: the `FlagValues` to define them in (tests pass their own).
    """
    fv = flag_values
    flags.DEFINE_string(
        "checkpoint",
        None,
        "The authors' SegNet state dict: .pth/.pt (needs PyTorch; read with "
        "weights_only=True), or a .npz/.safetensors export of it.",
        flag_values=fv,
    )
    flags.mark_flag_as_required("checkpoint", flag_values=fv)
    flags.register_validator(
        "checkpoint", _checkpoint_validator(checkpoint_suffixes), flag_values=fv
    )
    flags.DEFINE_string("output", None, "The Keras autoencoder to write (.keras).", flag_values=fv)
    flags.mark_flag_as_required("output", flag_values=fv)
    flags.register_validator(
        "output",
        lambda v: v is None or v.endswith(".keras"),
        message="--output must end with .keras",
        flag_values=fv,
    )
    flags.DEFINE_boolean("overwrite", False, "Replace --output if it exists.", flag_values=fv)
    flags.DEFINE_string(
        "image_size",
        None,
        "'S' or 'H,W' to fix the model's input size; default: any size (padded to a "
        "multiple of 32 inside the model).",
        flag_values=fv,
    )
    flags.register_validator("image_size", _check_image_size, flag_values=fv)
    flags.DEFINE_list(
        "skip_prefixes",
        [],
        "Key prefixes of other models stored in the same checkpoint to ignore (e.g. resnet.).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "pool_impl",
        "native",
        s2s_layers.POOL_IMPLS,
        "Pooling kernel of the converted model ('stock' compiles with XLA).",
        flag_values=fv,
    )

    @flags.multi_flags_validator(
        ["output", "overwrite"],
        message="--output exists; pass --overwrite to replace it",
        flag_values=fv,
    )
    def _output_is_free(values):
        return values["overwrite"] or not values["output"] or not os.path.exists(values["output"])
