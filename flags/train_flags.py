"""Flags of the training binary (`s2s_tf.train_main`).

`define_train_flags()` adds the stage, strategy, loop, optimizer and loss flags
on top of the shared data and model flags. Values that can be checked without
touching data or models are checked by validators, at parse time.
"""

import os

from absl import flags

from s2s_tf.flags import common_flags

STAGES = ("stage0", "stage1", "stage2")
STRATEGIES = ("mirrored", "multi_worker", "one_device")


def stage_dir_file(workdir, stage, filename):
    """The path `workdir/stage/filename`, or None without a workdir."""
    return os.path.join(workdir, stage, filename) if workdir else None


def define_train_flags(dataset_names, classifier_names):
    """Defines every flag of the training binary.

    Args:
      dataset_names: the data registry's names.
      classifier_names: the classifier registry's names.
    """
    common_flags.define_workdir_flag(required=True)
    common_flags.define_data_flags(dataset_names)
    common_flags.define_model_flags(classifier_names)
    flags.DEFINE_enum(
        "stage",
        None,
        STAGES,
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
    _define_strategy_flags()
    _register_stage2_inputs_validator()


def _define_loop_flags():
    flags.DEFINE_integer("train_steps", 1000, "Optimizer steps of the stage.", lower_bound=1)
    flags.DEFINE_integer("steps_per_loop", 50, "Steps per tf.function call.", lower_bound=1)
    flags.DEFINE_integer("checkpoint_every", 500, "Save a checkpoint every N steps.", lower_bound=1)
    flags.DEFINE_integer("eval_every", 500, "Evaluate every N steps.", lower_bound=1)
    flags.DEFINE_integer("summary_every", 500, "Images/histograms every N steps.", lower_bound=1)
    flags.DEFINE_bool("mixed_precision", False, "mixed_float16 with loss scaling (GPU).")
    flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA (GPU).")
    flags.DEFINE_enum("reconstruction_loss", "mse", ["mse", "l1"], "Stage-1 loss.")
    flags.DEFINE_enum(
        "stage2_loss", "xent", ["xent", "kl"], "xent: to labels; kl: to clean predictions."
    )
    flags.DEFINE_float(
        "reconstruction_weight", 0.0, "Stage 2: weight of a reconstruction term.", lower_bound=0
    )
    flags.register_validator(
        "jit_compile",
        lambda v: not v or flags.FLAGS.ae_pool_impl == "stock",
        message="--jit_compile needs --ae_pool_impl=stock (max_pool_with_argmax has no XLA kernel)",
    )


def _define_optimizer_flags():
    flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimizer.")
    flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
    flags.register_validator(
        "learning_rate", lambda v: v > 0, message="--learning_rate must be > 0"
    )
    flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine", "step"], "LR schedule.")
    flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps (cosine).", lower_bound=0)
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.", lower_bound=0, upper_bound=0.999)
    flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay.", lower_bound=0)
    flags.DEFINE_float("clip_global_norm", None, "Clip gradients to this global norm.")
    flags.register_validator(
        "clip_global_norm",
        lambda v: v is None or v > 0,
        message="--clip_global_norm must be > 0",
    )


def _define_strategy_flags():
    flags.DEFINE_enum(
        "strategy",
        "mirrored",
        STRATEGIES,
        "mirrored: all local GPUs (else CPU); multi_worker: from TF_CONFIG; one_device.",
    )
    flags.DEFINE_integer(
        "num_cpu_devices",
        0,
        "Split the CPU into N logical devices (test replicas without GPUs); 0: off.",
        lower_bound=0,
    )


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
            or stage_dir_file(values["workdir"], "stage1", "autoencoder.keras")
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
        path = values["classifier_path"] or stage_dir_file(
            values["workdir"], "stage0", "classifier.keras"
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
