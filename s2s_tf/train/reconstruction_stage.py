"""Stage 1: the autoencoder learns to reconstruct images, labels unused.

The loss (MSE or L1) is computed in the autoencoder's normalised space. With a
classifier given, evaluation also reports its accuracy alone and behind the
autoencoder.
"""

import os

from s2s_tf import constants
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model
from s2s_tf.models import vgg16_init
from s2s_tf.train import checkpointing
from s2s_tf.train import losses
from s2s_tf.train import stage_common


class ReconstructionStage(stage_common.RecalibratedStage):
    """Stage 1: the autoencoder learns to reconstruct images (labels unused).

    Args:
      config: a `ModelConfig`.
      loss: "mse" or "l1", computed in the autoencoder's normalised space.
      with_classifier: also evaluate the classifier alone and behind the
        autoencoder (needs a classifier in `config`).
      recalibration: a `Recalibration` for the final BatchNorm statistics, or None.
    """

    name = "stage1"
    train_keys = ("loss", "psnr")

    def __init__(self, config, loss="mse", with_classifier=False, recalibration=None):
        self.config, self.loss, self.with_classifier = config, loss, with_classifier
        self.recalibration = recalibration
        self.eval_keys = ("loss", "psnr") + (
            ("accuracy_classifier", "accuracy_defended") if with_classifier else ()
        )

    def build(self):
        shape = (*self.config.image_size, 3)
        self.autoencoder = ae_lib.build_autoencoder(self.config.autoencoder, input_shape=shape)
        if self.config.ae_init:
            vgg16_init.init_encoder_from_vgg16(self.autoencoder, self.config.ae_init)
        self.classifier = (
            stage_common.load_or_build_classifier(self.config) if self.with_classifier else None
        )

    @property
    def trainable_variables(self):
        return self.autoencoder.trainable_variables

    def checkpoint_items(self):
        return {"autoencoder": self.autoencoder}

    def _outputs(self, images, training):
        target = stage_common.normalize(images)
        reconstruction = self.autoencoder(target, training=training)
        return reconstruction, {
            "loss": losses.reconstruction_loss(target, reconstruction, self.loss),
            "psnr": losses.psnr(images, stage_common.denormalize(reconstruction)),
        }

    def train_outputs(self, images, labels):
        return self._outputs(images, training=True)[1]

    def eval_outputs(self, images, labels):
        reconstruction, outputs = self._outputs(images, training=False)
        if self.classifier is not None:
            clean = self.classifier(images, training=False)
            image = s2s_model.image_from_reconstruction(reconstruction)
            defended = self.classifier(image, training=False)
            outputs["accuracy_classifier"] = losses.correct(labels, clean)
            outputs["accuracy_defended"] = losses.correct(labels, defended)
        return outputs

    def summaries(self, images, labels, step):
        reconstruction = stage_common.denormalize(
            self.autoencoder(stage_common.normalize(images), training=False)
        )
        stage_common.image_pairs(images, reconstruction)
        stage_common.weight_histograms(self.autoencoder)
        if self.classifier is not None:
            defended = s2s_model.build_s2s_model(self.autoencoder, self.classifier)
            stage_common.input_gradient_histogram(defended, images, labels, "defended")

    def _bn_model(self):
        return self.autoencoder

    def _bn_forward(self, images, labels):
        return self.autoencoder(stage_common.normalize(images), training=True)

    def save_final(self, directory):
        self.recalibrate_batch_norm()
        path = os.path.join(directory, constants.AUTOENCODER_FILE)
        return [checkpointing.save_keras_atomic(self.autoencoder, path)]
