"""Flags shared by the s2s_tf binaries: data, models and the output directory.

Each `define_*_flags()` defines a group of absl flags with safe defaults and
validators, so a bad value fails at parse time, before any work starts.
Binaries call the groups they need, then turn `FLAGS` into the library's
config dataclasses; library code never reads flags.

Registry names (datasets, classifiers) are passed in by the binary, so this
package depends on absl alone.
"""

from absl import flags

STAGE_SEPARATOR = ";"


def parse_int_list(text, name):
    """Parses "2,3" into (2, 3).

    Args:
      text: comma-separated positive integers.
      name: the flag name, for the error message.

    Returns:
      A tuple of ints.

    Raises:
      ValueError: naming the flag when an item is not a positive integer.
    """
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{name} must hold positive integers, got {text!r}")
    return values


def parse_stage_widths(text):
    """Parses "64,64;128,128" into ((64, 64), (128, 128)) (stages split by ';')."""
    return tuple(parse_int_list(stage, "ae_stage_widths") for stage in text.split(STAGE_SEPARATOR))


def parse_image_size(text):
    """Parses "32" or "32,48" into (height, width)."""
    size = parse_int_list(text, "image_size")
    if len(size) not in (1, 2):
        raise ValueError(f"--image_size must be 'S' or 'H,W', got {text!r}")
    return size * 2 if len(size) == 1 else size


def register_parser_check(name, parser):
    """Validates a string flag by running its parser at flag-parsing time."""

    def check(value):
        if value is None:
            return True
        try:
            parser(value)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    flags.register_validator(name, check)


def define_workdir_flag(required=True):
    """Defines --workdir, where a run writes its config, checkpoints and outputs."""
    flags.DEFINE_string(
        "workdir", None, "Directory for this run's config, checkpoints and outputs."
    )
    if required:
        flags.mark_flag_as_required("workdir")


def define_data_flags(dataset_names, default_dataset="fashion_mnist"):
    """Defines the dataset flags.

    Args:
      dataset_names: the registry's source names; "tfds:<name>" is accepted too.
      default_dataset: the default of --dataset.
    """
    flags.DEFINE_string(
        "dataset",
        default_dataset,
        f"Data source: one of {', '.join(sorted(dataset_names))}, or tfds:<name> for any "
        "TensorFlow Datasets dataset.",
    )
    flags.register_validator(
        "dataset",
        lambda v: v in dataset_names or (v.startswith("tfds:") and len(v) > len("tfds:")),
        message=f"--dataset must be one of {sorted(dataset_names)} or tfds:<name>",
    )
    flags.DEFINE_string("data_dir", None, "Fashion-MNIST idx directory, or the TFDS data_dir.")
    flags.DEFINE_string("image_folder", None, "Root of a folder of class subfolders of images.")
    flags.DEFINE_string("manual_dir", None, "TFDS manual download dir (e.g. imagenet2012).")
    flags.DEFINE_string("image_size", "32", "Image size 'S' or 'H,W' the models work at.")
    register_parser_check("image_size", parse_image_size)
    flags.DEFINE_integer("batch_size", 64, "Global batch size (over all replicas).", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed for shuffling, augmentation and init.")
    flags.register_validator(
        "image_folder",
        lambda v: v is not None or flags.FLAGS.dataset != "folder",
        message="--dataset=folder needs --image_folder",
    )


def data_config_kwargs(flag_values=None):
    """The `data.DataConfig` fields that `define_data_flags` sets, as keyword arguments.

    Binaries add what is theirs (split, augmentation, example limit):
    `data.DataConfig(**data_config_kwargs(), split="test")`.

    Args:
      flag_values: parsed flags (default: the global `flags.FLAGS`).

    Returns:
      A dict of `DataConfig` keyword arguments.
    """
    values = flag_values or flags.FLAGS
    return {
        "source": values.dataset,
        "image_size": parse_image_size(values.image_size),
        "global_batch_size": values.batch_size,
        "seed": values.seed,
        "data_dir": values.data_dir,
        "folder": values.image_folder,
        "manual_dir": values.manual_dir,
    }


def define_model_flags(classifier_names, default_classifier="small_cnn"):
    """Defines the classifier and autoencoder flags.

    Args:
      classifier_names: the classifier registry's names.
      default_classifier: the default of --classifier.
    """
    flags.DEFINE_enum(
        "classifier", default_classifier, sorted(classifier_names), "Classifier architecture."
    )
    flags.DEFINE_integer("num_classes", 10, "Number of classes of the classifier.", lower_bound=1)
    flags.DEFINE_string(
        "classifier_weights",
        None,
        "None (random init), 'imagenet' (Keras weights; needs internet) or a local "
        ".weights.h5/.keras file.",
    )
    flags.DEFINE_string(
        "ae_stage_widths",
        "64,64;128,128;256,256,256;512,512,512;512,512,512",
        "Autoencoder encoder widths, stages split by ';' (the decoder mirrors them).",
    )
    register_parser_check("ae_stage_widths", parse_stage_widths)
    flags.DEFINE_integer(
        "ae_stages",
        3,
        "How many of --ae_stage_widths to use (5 = the paper's SegNet).",
        lower_bound=1,
    )
    flags.DEFINE_enum(
        "ae_pool_impl", "native", ["native", "stock"], "Pooling kernel ('stock' compiles with XLA)."
    )
    flags.DEFINE_string(
        "ae_init",
        None,
        "Initialise the encoder from VGG16: 'imagenet' or a local VGG16 .weights.h5/.keras file.",
    )

    @flags.multi_flags_validator(
        ["ae_stage_widths", "ae_stages"],
        message="--ae_stages exceeds the number of stages in --ae_stage_widths",
    )
    def _check_stages(values):
        try:
            return values["ae_stages"] <= len(parse_stage_widths(values["ae_stage_widths"]))
        except ValueError:
            return True  # reported by the --ae_stage_widths validator
