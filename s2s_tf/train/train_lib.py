"""Library entry point of the training binary: one config in, one stage trained.

    train_lib.train(config, workdir, strategy)

builds the stage named by `config.stage`, trains it with `trainer.Trainer`
(resuming from its checkpoints), writes `config.json` beside the checkpoints
and the final `.keras` model(s) where the next stage, evaluation and export
load them:

    workdir/stage0/classifier.keras      stage 0 (the classifier, [0, 1] input)
    workdir/stage1/autoencoder.keras     stage 1
    workdir/stage2/autoencoder.keras     stage 2 (fine-tuned decoder)
    workdir/stage2/defended.keras        stage 2 composite, [0, 1] image -> logits

Stages 0 and 2 also take an adversarial objective (`stage0_objective`,
`stage2_objective`) with its inner attack and held-out robustness check
(`adversarial.AdversarialConfig`); stage 2 trains the decoder or the whole
autoencoder (`stage2_trainable`).
"""

import dataclasses
import json
import os

from absl import logging

from s2s_tf import config_io
from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf.config_io import setting
from s2s_tf.train import adversarial as adversarial_lib
from s2s_tf.train import distribute
from s2s_tf.train import losses
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import trainer

# `TrainConfig.stage2_trainable`'s default: what measured better for the stage-2 objective.
STAGE2_TRAINABLE_AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs (written to `<stage dir>/config.json`).

    Attributes:
      stage: "stage0" (classifier), "stage1" (reconstruction) or "stage2"
        (decoder fine-tuning).
      model: where the models come from (`stages.ModelConfig`).
      train_data: the training split and global batch size.
      eval_data: the evaluation split, or None.
      loop: steps and reporting (`trainer.LoopConfig`).
      optimizer: `optim.OptimizerConfig`.
      reconstruction_loss: "mse" or "l1" (stage 1, and stage 2's extra term).
      stage2_loss: "kl" (to the classifier's clean predictions; no labels
        needed) or "xent" (to the labels).
      reconstruction_weight: weight of the reconstruction term in stage 2.
      bn_recalibration_batches: training batches that re-estimate the trained
        BatchNorm layers' statistics before the final model is saved (0: keep
        the moving averages).
      stage0_objective: "standard" or "adversarial" (Madry's PGD training).
      stage2_objective: "paper" or "adversarial" (TRADES-style, against the
        soft-routing surrogate attack).
      stage2_trainable: "decoder" (the paper), "autoencoder" (encoder too) or
        "auto" (the decoder for the paper's objective, the autoencoder for the
        adversarial one; `resolve` replaces it).
      adversarial: the inner attack of the adversarial objectives and the
        held-out robustness check of stages 0 and 2.
    """

    stage: str = "stage1"
    model: stages.ModelConfig = stages.ModelConfig()
    train_data: data_lib.DataConfig = data_lib.DataConfig()
    eval_data: data_lib.DataConfig | None = None
    loop: trainer.LoopConfig = trainer.LoopConfig()
    optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
    reconstruction_loss: str = setting("mse", "Stage-1 loss.", choices=losses.RECONSTRUCTION_LOSSES)
    stage2_loss: str = setting(
        "kl",
        "Stage 2: kl (to the classifier's clean predictions; no labels needed) or xent "
        "(to the labels).",
        choices=losses.STAGE2_LOSSES,
    )
    # Without it the decoder drifts from reconstructing (PSNR 27 -> 24 dB with kl, 18 with xent).
    reconstruction_weight: float = setting(
        1.0, "Stage 2: weight of the reconstruction term (0: none).", lower_bound=0
    )
    bn_recalibration_batches: int = setting(
        100,
        "Training batches that re-estimate BatchNorm statistics at the end of a stage "
        "(0: keep the moving averages).",
        lower_bound=0,
    )
    stage0_objective: str = setting(
        "standard",
        "Stage 0: standard (cross-entropy) or adversarial (PGD adversarial training, Madry).",
        choices=stages.STAGE0_OBJECTIVES,
    )
    stage2_objective: str = setting(
        "paper",
        "Stage 2: paper, or adversarial (TRADES-style robust KL against the soft-routing "
        "surrogate attack, label-free with --stage2_loss=kl).",
        choices=stages.STAGE2_OBJECTIVES,
    )
    # "auto" picks what measured better for each objective: the paper's stage 2 trains the
    # decoder; adversarial stage 2 the whole autoencoder (held-out check at 8/255 57.8 % vs
    # 46.9 %, clean 82.9 % vs 73.2 %, README "Adversarial stage 2 and the robust job").
    stage2_trainable: str = setting(
        STAGE2_TRAINABLE_AUTO,
        "Stage 2 trains the decoder (the paper) or the whole autoencoder; auto: the decoder "
        "for --stage2_objective=paper, the autoencoder for adversarial.",
        choices=lambda: (STAGE2_TRAINABLE_AUTO, *stages.STAGE2_PARTS),
    )
    adversarial: adversarial_lib.AdversarialConfig = adversarial_lib.AdversarialConfig()

    @property
    def trains_adversarially(self):
        """Whether the stage trains against the inner attack (Madry; adversarial stage 2)."""
        objective = {"stage0": self.stage0_objective, "stage2": self.stage2_objective}
        return objective.get(self.stage) == "adversarial"

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        if self.stage not in constants.STAGES:
            raise ValueError(f"stage must be one of {constants.STAGES}, got {self.stage!r}")
        if self.reconstruction_loss not in losses.RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction_loss must be one of {losses.RECONSTRUCTION_LOSSES}")
        if self.stage2_loss not in losses.STAGE2_LOSSES:
            raise ValueError(f"stage2_loss must be one of {losses.STAGE2_LOSSES}")
        batches = self.bn_recalibration_batches
        if not isinstance(batches, int) or batches < 0:
            raise ValueError(f"bn_recalibration_batches must be an int >= 0, got {batches!r}")
        if self.stage == "stage2" and not self.model.autoencoder_path:
            raise ValueError("stage 2 needs model.autoencoder_path (stage 1's autoencoder)")
        for name, choices in (
            ("stage0_objective", stages.STAGE0_OBJECTIVES),
            ("stage2_objective", stages.STAGE2_OBJECTIVES),
            ("stage2_trainable", (STAGE2_TRAINABLE_AUTO, *stages.STAGE2_PARTS)),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        self.adversarial.validate()
        self.loop.validate()
        if self.trains_adversarially:
            self.adversarial.check_ramp(self.loop.train_steps, "train_steps")
        self.optimizer.validate()
        self.model.autoencoder.validate()


def resolve(config):
    """`config` with `stage2_trainable="auto"` replaced by what it picks for the objective."""
    if config.stage2_trainable != STAGE2_TRAINABLE_AUTO:
        return config
    part = "autoencoder" if config.stage2_objective == "adversarial" else "decoder"
    return dataclasses.replace(config, stage2_trainable=part)


def make_stage(config):
    """Returns the `trainer.Stage` that `config.stage` names."""
    config = resolve(config)
    recalibration = stages.Recalibration(config.train_data, config.bn_recalibration_batches)
    seed = config.train_data.seed
    if config.stage == "stage0":
        madry = config.adversarial if config.trains_adversarially else None
        return stages.ClassifierStage(config.model, recalibration, madry, seed)
    if config.stage == "stage1":
        with_classifier = bool(config.model.classifier_path or config.model.classifier_weights)
        return stages.ReconstructionStage(
            config.model, config.reconstruction_loss, with_classifier, recalibration
        )
    # The paper's objective gets the robustness check too, to compare the two in TensorBoard.
    return stages.DecoderStage(
        config.model,
        config.stage2_loss,
        config.reconstruction_weight,
        config.reconstruction_loss,
        recalibration,
        objective=config.stage2_objective,
        trainable=config.stage2_trainable,
        adversarial=config.adversarial,
        calibration_data=config.train_data,
        seed=seed,
    )


def train(config, workdir, strategy):
    """Trains one stage to completion (or to SIGTERM), resuming from checkpoints.

    Args:
      config: a `TrainConfig`.
      workdir: the run's directory (shared by the stages).
      strategy: a `tf.distribute.Strategy`.

    Returns:
      The trainer's result dict (step, metrics, final model paths, preempted).
    """
    config.validate()
    config = resolve(config)  # the config.json beside the models says what trained
    stage = make_stage(config)
    run = trainer.Trainer(
        stage,
        strategy,
        config.loop,
        config.optimizer,
        workdir,
        config.train_data,
        config.eval_data,
        config_text=json.dumps(config_io.config_to_dict(config), indent=2),
    )
    chief = distribute.is_chief(strategy)
    if chief:
        config_io.save_config(config, run.stage_dir)
    result = run.train()
    # The trainer evaluated before the final BatchNorm statistics were re-estimated
    # (the chief re-estimates them in `save_final`; other workers do it here, so
    # that all evaluate the same model): evaluate the final model again.
    if not result["preempted"] and stage.recalibrate_batch_norm():
        result["eval_before_bn_recalibration"] = result["eval"]
        result["eval"] = run.evaluate(tag_prefix="bn_recalibrated/")
        robust = run.check_robustness(tag_prefix="bn_recalibrated/")
        if robust:
            result["robust_check_before_bn_recalibration"] = result.get("robust_check")
            result["robust_check"] = robust
    if chief:
        with open(os.path.join(run.stage_dir, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    logging.info("%s finished: %s", stage.name, json.dumps(result))
    return result
