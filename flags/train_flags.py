"""Flags of the training binary (`s2s_tf.train_main`).

`define_train_flags()` adds the stage, strategy, loop, optimizer and loss flags
on top of the shared data and model flags. Values that can be checked without
touching data or models are checked by validators, at parse time.
"""

import os

from absl import flags

from s2s_tf import constants
from s2s_tf.flags import common_flags
from s2s_tf.flags import config_flags
from s2s_tf.train import adversarial
from s2s_tf.train import optim
from s2s_tf.train import train_lib
from s2s_tf.train import trainer


def define_train_flags():
    """Defines every flag of the training binary."""
    common_flags.define_workdir_flag(required=True)
    common_flags.define_data_flags()
    common_flags.define_model_flags()
    flags.DEFINE_enum(
        "stage",
        None,
        constants.STAGES,
        "stage0: train the classifier; stage1: reconstruction; stage2: decoder fine-tuning.",
    )
    flags.mark_flag_as_required("stage")
    flags.DEFINE_string("train_split", "train", "Training split.")
    flags.DEFINE_string("eval_split", "test", "Evaluation split ('' for no evaluation).")
    flags.DEFINE_integer("eval_examples", None, "Evaluate on the first N examples only.", 1)
    flags.DEFINE_string(
        "classifier_path",
        None,
        "A .keras classifier on [0, 1] images; default: <workdir>/stage0/classifier.keras "
        "when it exists.",
    )
    flags.DEFINE_string(
        "autoencoder_path",
        None,
        "Stage 2: the stage-1 autoencoder (.keras); default <workdir>/stage1/autoencoder.keras.",
    )
    flags.DEFINE_string(
        "init_from",
        None,
        "Stage 2: start from the authors' released S2SNet instead of a stage-1 run: the "
        ".keras file of s2s_tf.convert_main, or their .pth/.pt/.npz/.safetensors checkpoint "
        "(converted on load; .pth needs PyTorch).",
    )
    _define_loop_flags()
    _define_optimizer_flags()
    _define_adversarial_flags()
    common_flags.define_strategy_flags()
    _register_stage2_inputs_validator()


def _define_loop_flags():
    config_flags.define(trainer.LoopConfig)
    config_flags.define(train_lib.TrainConfig)
    flags.register_validator(
        "jit_compile",
        lambda v: not v or flags.FLAGS.ae_pool_impl == "stock",
        message="--jit_compile needs --ae_pool_impl=stock (max_pool_with_argmax has no XLA kernel)",
    )


def _define_optimizer_flags():
    config_flags.define(optim.OptimizerConfig)


def _define_adversarial_flags():
    """--train_eps and the other inner-attack flags (stages 0 and 2 read them)."""
    config_flags.define(adversarial.AdversarialConfig)


def _register_stage2_inputs_validator():
    @flags.multi_flags_validator(
        ["stage", "autoencoder_path", "init_from"],
        message="--init_from is for --stage=stage2 and replaces --autoencoder_path",
    )
    def _init_from_is_for_stage2(values):
        if not values["init_from"]:
            return True
        return values["stage"] == "stage2" and not values["autoencoder_path"]

    @flags.multi_flags_validator(
        ["stage", "workdir", "autoencoder_path", "init_from"],
        message="--stage=stage2 needs a stage-1 autoencoder: run --stage=stage1 with this "
        "--workdir first, or pass --autoencoder_path or --init_from",
    )
    def _stage2_has_autoencoder(values):
        if values["stage"] != "stage2":
            return True
        path = (
            values["init_from"]
            or values["autoencoder_path"]
            or (values["workdir"] and constants.autoencoder_path(values["workdir"]))
        )
        return bool(path) and os.path.exists(path)

    @flags.multi_flags_validator(
        ["stage", "workdir", "classifier_path", "classifier_weights"],
        message="--stage=stage2 needs a trained classifier: run --stage=stage0 with this "
        "--workdir, or pass --classifier_path or --classifier_weights",
    )
    def _stage2_has_classifier(values):
        if values["stage"] != "stage2" or values["classifier_weights"]:
            return True
        path = values["classifier_path"] or (
            values["workdir"] and constants.classifier_path(values["workdir"])
        )
        return bool(path) and os.path.exists(path)

    flags.register_validator(
        "classifier_path",
        lambda v: v is None or os.path.exists(v),
        message="--classifier_path does not exist",
    )
    flags.register_validator(
        "autoencoder_path",
        lambda v: v is None or os.path.exists(v),
        message="--autoencoder_path does not exist",
    )
    flags.register_validator(
        "init_from",
        lambda v: v is None or os.path.exists(v),
        message="--init_from does not exist",
    )
