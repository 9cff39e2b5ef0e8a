"""Stage 2: the autoencoder learns, from the frozen classifier's gradients, to defend it.

Two objectives (`objective`), two choices of what trains (`trainable`):

- "paper" (the authors' stage 2): the classifier on the reconstruction should
  answer as on the clean image (KL to its clean predictions, label-free; or
  cross-entropy to the labels), plus a reconstruction term.
- "adversarial": the same terms plus a robust term, TRADES-style (Zhang et al.
  2019): KL between the defended model's outputs on the clean image and on the
  image perturbed by the inner attack (`adversarial.perturb`). The attack
  maximises that KL through the soft-routing surrogate of the autoencoder
  (`surrogates.soft_routing_model_fn`: the real model forward, the smooth
  surrogate backward, each pool's temperature relative to its activation scale
  measured on training images once, at build), never through the hard pooling
  switches. No label enters the loss or the attack unless the loss is "xent"
  (then the robust term and the attack use the cross-entropy to the label).
- "decoder" trains the decoder only: the encoder (BatchNorm statistics
  included) runs in inference mode and its outputs pass through
  `stop_gradient`. "autoencoder" trains the encoder too. The classifier is
  always frozen and runs in inference mode.

The classifier sees `s2s_model.image_from_reconstruction` of the autoencoder's
output, the image the defended composite gives it.
"""

import dataclasses
import os

import tensorflow as tf

from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.models import torch_convert
from s2s_tf.robustness import surrogates
from s2s_tf.train import adversarial as adversarial_lib
from s2s_tf.train import checkpointing
from s2s_tf.train import losses
from s2s_tf.train import stage_common

STAGE2_OBJECTIVES = ("paper", "adversarial")
STAGE2_PARTS = ("decoder", "autoencoder")
# Training images the surrogate's per-pool activation scales are measured on.
CALIBRATION_EXAMPLES = 256


class DecoderStage(stage_common.RecalibratedStage):
    """Stage 2: fine-tunes the autoencoder (by default its decoder) against the classifier.

    Args:
      config: a `ModelConfig` with `autoencoder_path` (stage 1's model) and a
        pretrained classifier (`classifier_path`, or registry weights).
      loss: "kl" (KL divergence to the classifier's predictions on the clean
        image; needs no labels, so any pretrained classifier can be defended on
        unlabelled images) or "xent" (cross-entropy to the labels).
      reconstruction_weight: weight of an added reconstruction term (0: none).
      reconstruction_loss: "mse" or "l1" for that term.
      recalibration: a `Recalibration` for the trained BatchNorm statistics, or None.
      objective: "paper" or "adversarial".
      trainable: "decoder" or "autoencoder".
      adversarial: an `adversarial.AdversarialConfig`: the inner attack (needed by
        the adversarial objective) and the held-out robustness check (either
        objective; None: no check).
      calibration_data: the training split (`data.DataConfig`) the surrogate's
        scales are measured on; needed with `adversarial`.
      seed: seed of the attacks' random starts.

    Raises:
      ValueError: naming the first invalid argument.
    """

    name = "stage2"
    eval_keys = ("task_loss", "psnr", "accuracy_classifier", "accuracy_defended")

    def __init__(
        self,
        config,
        loss="kl",
        reconstruction_weight=1.0,
        reconstruction_loss="mse",
        recalibration=None,
        *,
        objective="paper",
        trainable="decoder",
        adversarial=None,
        calibration_data=None,
        seed=0,
    ):
        if loss not in losses.STAGE2_LOSSES:
            raise ValueError(f"stage-2 loss must be one of {losses.STAGE2_LOSSES}, got {loss!r}")
        if reconstruction_weight < 0:
            raise ValueError(f"reconstruction_weight must be >= 0, got {reconstruction_weight}")
        if objective not in STAGE2_OBJECTIVES:
            raise ValueError(f"objective must be one of {STAGE2_OBJECTIVES}, got {objective!r}")
        if trainable not in STAGE2_PARTS:
            raise ValueError(f"trainable must be one of {STAGE2_PARTS}, got {trainable!r}")
        if objective == "adversarial" and adversarial is None:
            raise ValueError("the adversarial objective needs an AdversarialConfig")
        if adversarial is not None:
            adversarial.validate()
            if calibration_data is None:
                raise ValueError("an AdversarialConfig needs calibration_data (training split)")
            self.robust_check_examples = adversarial.robust_check_examples
        self.config, self.loss = config, loss
        self.reconstruction_weight = reconstruction_weight
        self.reconstruction_loss = reconstruction_loss
        self.recalibration = recalibration
        self.objective, self.trainable = objective, trainable
        self.adversarial, self.calibration_data, self.seed = adversarial, calibration_data, seed
        self.train_keys = ("loss", "task_loss", "reconstruction", "accuracy_defended")
        if objective == "adversarial":
            self.train_keys += ("robust_loss", "accuracy_adversarial", "perturbation_linf")

    def build(self):
        if not self.config.autoencoder_path:
            raise ValueError("stage 2 needs the stage-1 autoencoder (autoencoder_path)")
        path = self.config.autoencoder_path
        if path.lower().endswith(torch_convert.CHECKPOINT_SUFFIXES):
            self.autoencoder = torch_convert.load_autoencoder(
                path, pool_impl=self.config.autoencoder.pool_impl
            )
        else:
            self.autoencoder = s2s_model.load_keras(path, "stage-1 autoencoder model")
        self.classifier = stage_common.load_or_build_classifier(self.config)
        # Frozen parts: no trainable variables, inference-mode BatchNorm.
        ae_lib.get_encoder(self.autoencoder).trainable = self.trainable == "autoencoder"
        self.classifier.trainable = False
        self.decoder = ae_lib.get_decoder(self.autoencoder)
        if self.adversarial is not None:
            self._build_attack()

    def _build_attack(self):
        """The surrogate model_fn of the inner attack and the check, on calibrated scales."""
        purifier = s2s_model.build_purifier(self.autoencoder, (*self.config.image_size, 3))
        data = dataclasses.replace(
            self.calibration_data,
            augment="off",
            num_examples=CALIBRATION_EXAMPLES,
            global_batch_size=CALIBRATION_EXAMPLES,
        )
        self.surrogate_scales = surrogates.calibrate(purifier, data_lib.load_numpy(data)[0])
        self.attack_model_fn = surrogates.soft_routing_model_fn(
            purifier,
            self.classifier,
            self.adversarial.train_surrogate_temperature,
            scales=self.surrogate_scales,
        )
        self._check = adversarial_lib.robust_accuracy_fn(
            self.attack_model_fn,
            self.adversarial.train_eps,
            self.adversarial.robust_check_steps,
            self.seed,
        )

    @property
    def trainable_variables(self):
        if self.trainable == "autoencoder":
            return self.autoencoder.trainable_variables
        return self.decoder.trainable_variables

    def checkpoint_items(self):
        return {"autoencoder": self.autoencoder, "classifier": self.classifier}

    def _forward(self, normalized, training):
        """The autoencoder on normalised images; the encoder frozen unless it trains."""
        if self.trainable == "autoencoder":
            return self.autoencoder(normalized, training=training)
        return ae_lib.decoder_only_forward(self.autoencoder, normalized, training=training)

    def _defended_logits(self, reconstruction):
        image = s2s_model.image_from_reconstruction(reconstruction)  # as the composite sees it
        return self.classifier(image, training=False)

    def _task_loss(self, images, labels, logits):
        if self.loss == "xent":
            return losses.cross_entropy(labels, logits)
        reference = self.classifier(images, training=False)
        return losses.kl_to_reference(reference, logits)

    def perturb(self, images, labels, step):
        """The inner attack's images for a batch at global step `step` (no gradient).

        Label-free with the "kl" loss: the attack maximises the KL from the defended
        model's clean output, and `labels` is not used.
        """
        config = self.adversarial
        if self.loss == "xent":

            def loss_fn(logits):
                return losses.cross_entropy(labels, logits)

        else:
            clean = tf.stop_gradient(tf.cast(self.attack_model_fn(images), tf.float32))

            def loss_fn(logits):
                return adversarial_lib.trades_kl(clean, logits)

        seeds = adversarial_lib.example_seeds(self.seed, step, tf.shape(images)[0])
        eps, step_size = config.budget_at(step)
        return adversarial_lib.perturb(
            self.attack_model_fn, images, loss_fn, eps, config.steps, step_size, seeds
        )

    def train_outputs(self, images, labels):
        if self.objective == "paper":
            target = stage_common.normalize(images)
            reconstruction = self._forward(target, training=True)
            logits = self._defended_logits(reconstruction)
            return self._terms(images, labels, target, reconstruction, logits)
        count = tf.shape(images)[0]
        perturbed = self.perturb(images, labels, self.global_step)
        # One pass over clean and perturbed images: BatchNorm sees both in one batch.
        target = stage_common.normalize(tf.concat([images, perturbed], axis=0))
        reconstruction = self._forward(target, training=True)
        logits = self._defended_logits(reconstruction)
        clean_logits, adversarial_logits = logits[:count], logits[count:]
        outputs = self._terms(images, labels, target[:count], reconstruction[:count], clean_logits)
        if self.loss == "xent":
            robust = losses.cross_entropy(labels, adversarial_logits)
        else:
            robust = adversarial_lib.trades_kl(clean_logits, adversarial_logits)
        outputs["loss"] += self.adversarial.robust_weight * robust
        outputs["robust_loss"] = robust
        outputs["accuracy_adversarial"] = losses.correct(labels, adversarial_logits)
        outputs["perturbation_linf"] = adversarial_lib.linf(images, perturbed)
        return outputs

    def _terms(self, images, labels, target, reconstruction, logits):
        """The paper's terms: task loss + weight x reconstruction, and the clean accuracy."""
        task = self._task_loss(images, labels, logits)
        recon = losses.reconstruction_loss(target, reconstruction, self.reconstruction_loss)
        return {
            "loss": task + self.reconstruction_weight * recon,
            "task_loss": task,
            "reconstruction": recon,
            "accuracy_defended": losses.correct(labels, logits),
        }

    def eval_outputs(self, images, labels):
        output = self.autoencoder(stage_common.normalize(images), training=False)
        reconstruction = s2s_model.image_from_reconstruction(output)
        logits = self.classifier(reconstruction, training=False)
        return {
            "task_loss": self._task_loss(images, labels, logits),
            "psnr": losses.psnr(images, reconstruction),
            "accuracy_classifier": losses.correct(labels, self.classifier(images, training=False)),
            "accuracy_defended": losses.correct(labels, logits),
        }

    def robust_check(self, images, labels):
        return self._check(images, labels)

    def summaries(self, images, labels, step):
        output = self.autoencoder(stage_common.normalize(images), training=False)
        stage_common.image_pairs(images, s2s_model.image_from_reconstruction(output))
        stage_common.weight_histograms(
            self.autoencoder if self.trainable == "autoencoder" else self.decoder
        )
        defended = s2s_model.build_s2s_model(self.autoencoder, self.classifier)
        stage_common.input_gradient_histogram(defended, images, labels, "defended")
        stage_common.input_gradient_histogram(self.classifier, images, labels, "classifier")

    def _bn_model(self):
        return self.autoencoder if self.trainable == "autoencoder" else self.decoder

    def _bn_forward(self, images, labels):
        if self.objective == "adversarial":
            perturbed = self.perturb(images, labels, self.global_step)
            images = tf.concat([images, perturbed], axis=0)
        return self._forward(stage_common.normalize(images), training=True)

    def save_final(self, directory):
        self.recalibrate_batch_norm()
        defended = s2s_model.build_s2s_model(self.autoencoder, self.classifier)
        return [
            checkpointing.save_keras_atomic(
                self.autoencoder, os.path.join(directory, constants.AUTOENCODER_FILE)
            ),
            checkpointing.save_keras_atomic(
                defended, os.path.join(directory, constants.DEFENDED_FILE)
            ),
        ]
