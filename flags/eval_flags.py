"""Flags of the evaluation binary (`s2s_tf.evaluate_main`).

The attack settings come from `evaluation.EvalConfig`'s and
`eval_lib.EvalRunConfig`'s declarations; this module adds where the models and
the report are, and the checks that span several flags.
"""

import os

from absl import flags

from s2s_tf import constants
from s2s_tf.flags import common_flags
from s2s_tf.flags import config_flags
from s2s_tf.robustness import eval_lib
from s2s_tf.robustness import evaluation


def define_eval_flags():
    """Defines every flag of the evaluation binary."""
    common_flags.define_workdir_flag(required=False)
    common_flags.define_data_flags()
    flags.DEFINE_string("eval_split", "test", "Split the examples come from.")
    flags.DEFINE_string(
        "defended_path", None, "Defended .keras model; default <workdir>/stage2/defended.keras."
    )
    flags.DEFINE_string("autoencoder_path", None, "Autoencoder .keras (with --classifier_path).")
    flags.DEFINE_string("classifier_path", None, "[0, 1]-input classifier .keras.")
    flags.DEFINE_string("output_dir", None, "Report directory; default <workdir>/eval_report.")
    config_flags.define(evaluation.EvalConfig)
    config_flags.define(eval_lib.EvalRunConfig)
    common_flags.define_strategy_flags()

    @flags.multi_flags_validator(
        ["workdir", "defended_path", "autoencoder_path", "classifier_path"],
        message="give --workdir (with a finished stage 2), --defended_path, or both "
        "--autoencoder_path and --classifier_path; the model files must exist",
    )
    def _has_models(values):
        if values["autoencoder_path"] or values["classifier_path"]:
            paths = [values["autoencoder_path"], values["classifier_path"]]
        else:
            default = values["workdir"] and constants.defended_path(values["workdir"])
            paths = [values["defended_path"] or default]
        return all(p and os.path.exists(p) for p in paths)
