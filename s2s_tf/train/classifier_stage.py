"""Stage 0: the classifier, trained on clean images or adversarially (Madry et al. 2018).

The adversarial objective replaces each training image by the last iterate of
the inner attack (`adversarial.perturb`: PGD-k or FGSM with a random start,
maximising the cross-entropy to the label, the classifier in inference mode)
and minimises the cross-entropy there: the anchor a user who can retrain the
classifier would pick instead of a purifier in front of it.
"""

import os

import tensorflow as tf

from s2s_tf import constants
from s2s_tf.train import adversarial as adversarial_lib
from s2s_tf.train import checkpointing
from s2s_tf.train import losses
from s2s_tf.train import stage_common

STAGE0_OBJECTIVES = ("standard", "adversarial")


class ClassifierStage(stage_common.RecalibratedStage):
    """Stage 0: supervised training of the classifier on [0, 1] images.

    Args:
      config: a `ModelConfig`.
      recalibration: a `Recalibration` for the final BatchNorm statistics, or None.
        After adversarial training the statistics are re-estimated on adversarial
        images, as the layers saw in training.
      adversarial: an `adversarial.AdversarialConfig` for Madry's adversarial
        training, or None for the standard objective.
      seed: seed of the inner attack's random starts.
    """

    name = "stage0"
    train_keys = ("loss", "accuracy")
    eval_keys = ("loss", "accuracy")

    def __init__(self, config, recalibration=None, adversarial=None, seed=0):
        self.config, self.recalibration = config, recalibration
        self.adversarial, self.seed = adversarial, seed
        if adversarial is not None:
            adversarial.validate()
            self.train_keys = ("loss", "accuracy", "perturbation_linf")
            self.robust_check_examples = adversarial.robust_check_examples

    def build(self):
        self.classifier = stage_common.load_or_build_classifier(self.config)
        if self.adversarial is not None:
            self._check = adversarial_lib.robust_accuracy_fn(
                self._inference,
                self.adversarial.train_eps,
                self.adversarial.robust_check_steps,
                self.seed,
            )

    def _inference(self, images):
        return self.classifier(images, training=False)

    @property
    def trainable_variables(self):
        return self.classifier.trainable_variables

    def checkpoint_items(self):
        return {"classifier": self.classifier}

    def regularization_losses(self):
        return list(self.classifier.losses)

    def perturb(self, images, labels, step):
        """The inner attack's images for a batch at global step `step` (no gradient)."""
        config = self.adversarial
        seeds = adversarial_lib.example_seeds(self.seed, step, tf.shape(images)[0])
        eps, step_size = config.budget_at(step)
        return adversarial_lib.perturb(
            self._inference,
            images,
            lambda logits: losses.cross_entropy(labels, logits),
            eps,
            config.steps,
            step_size,
            seeds,
        )

    def _outputs(self, images, labels, training):
        logits = self.classifier(images, training=training)
        return {
            "loss": losses.cross_entropy(labels, logits),
            "accuracy": losses.correct(labels, logits),
        }

    def train_outputs(self, images, labels):
        if self.adversarial is None:
            return self._outputs(images, labels, training=True)
        adversarial_images = self.perturb(images, labels, self.global_step)
        outputs = self._outputs(adversarial_images, labels, training=True)
        outputs["perturbation_linf"] = adversarial_lib.linf(images, adversarial_images)
        return outputs

    def eval_outputs(self, images, labels):
        return self._outputs(images, labels, training=False)

    def robust_check(self, images, labels):
        return self._check(images, labels)

    def summaries(self, images, labels, step):
        stage_common.weight_histograms(self.classifier)
        stage_common.input_gradient_histogram(self.classifier, images, labels, "classifier")

    def _bn_model(self):
        return self.classifier

    def _bn_forward(self, images, labels):
        if self.adversarial is not None:
            images = self.perturb(images, labels, self.global_step)
        return self.classifier(images, training=True)

    def save_final(self, directory):
        self.recalibrate_batch_norm()
        path = os.path.join(directory, constants.CLASSIFIER_FILE)
        return [checkpointing.save_keras_atomic(self.classifier, path)]
