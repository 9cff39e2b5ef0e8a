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
from s2s_tf.robustness import streaming


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
    config_flags.define(streaming.StreamConfig)
    common_flags.define_strategy_flags()
    _define_worker_flags()

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


def _define_worker_flags():
    """--eval_workers and --eval_worker_index: processes sharing one evaluation's shards."""
    flags.DEFINE_integer(
        "eval_workers",
        1,
        "Processes (on any machines, with --output_dir on storage they share) that split the "
        "evaluation's shards; with --strategy=multi_worker, TF_CONFIG's tasks instead.",
        lower_bound=1,
    )
    flags.DEFINE_integer(
        "eval_worker_index",
        0,
        "This process's index among --eval_workers; worker 0 merges the shards and writes "
        "the report.",
        lower_bound=0,
    )

    @flags.multi_flags_validator(
        ["eval_workers", "eval_worker_index", "strategy"],
        message="--eval_worker_index must be below --eval_workers, and with "
        "--strategy=multi_worker both come from TF_CONFIG (leave them unset)",
    )
    def _check_worker(values):
        if values["strategy"] == "multi_worker":
            return values["eval_workers"] == 1 and values["eval_worker_index"] == 0
        return values["eval_worker_index"] < values["eval_workers"]


def worker_from_flags(flag_values=None):
    """The `streaming.Worker` of --eval_workers/--eval_worker_index, or of TF_CONFIG."""
    values = flag_values or flags.FLAGS
    if values.strategy == "multi_worker":
        return streaming.worker_from_tf_config(os.environ.get("TF_CONFIG"))
    return streaming.Worker(values.eval_worker_index, values.eval_workers)
