"""Flags of the pipeline binary (`s2s_tf.pipeline_main`): data -> defense -> report -> export."""

from absl import flags

from s2s_tf.flags import common_flags


def define_pipeline_flags(dataset_names, classifier_names):
    """Defines every flag of the pipeline binary.

    Args:
      dataset_names: the data registry's names.
      classifier_names: the classifier registry's names.
    """
    common_flags.define_data_flags(dataset_names)
    flags.FLAGS.set_default("image_size", "28")
    flags.DEFINE_string("workdir", "workdir/fmnist", "Directory of the whole run.")
    flags.DEFINE_bool("fresh", False, "Delete --workdir first and start again.")
    flags.DEFINE_string("eval_split", "test", "Split for evaluation and the report.")
    flags.DEFINE_enum("classifier", "small_cnn", sorted(classifier_names), "Defended classifier.")
    flags.DEFINE_string(
        "transfer_classifier", "lenet5", "Second classifier for the transfer matrix ('' for none)."
    )
    flags.register_validator(
        "transfer_classifier",
        lambda v: not v or v in classifier_names,
        message=f"--transfer_classifier must be '' or one of {sorted(classifier_names)}",
    )
    flags.DEFINE_string(
        "ae_stage_widths", "32,32;64,64;128,128", "Autoencoder widths, stages split by ';'."
    )
    common_flags.register_parser_check("ae_stage_widths", common_flags.parse_stage_widths)
    flags.DEFINE_integer("classifier_steps", 400, "Steps of each classifier.", lower_bound=1)
    flags.DEFINE_integer("stage1_steps", 500, "Steps of stage 1.", lower_bound=1)
    flags.DEFINE_integer("stage2_steps", 300, "Steps of stage 2.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
    flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0")
    flags.DEFINE_integer("num_examples", 200, "Examples attacked in the report.", lower_bound=1)
    flags.DEFINE_integer("spsa_examples", 20, "Examples for SPSA.", lower_bound=1)
    flags.DEFINE_integer("attack_steps", 10, "Iterations of PGD.", lower_bound=1)
    flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "one_device"], "Strategy.")
