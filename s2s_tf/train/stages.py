"""The three training stages of S2SNet as `trainer.Stage`s.

- `ClassifierStage` (stage 0): trains a registry classifier with cross-entropy,
  for data that has no pretrained classifier.
- `ReconstructionStage` (stage 1): unsupervised reconstruction in the
  autoencoder's normalised space (MSE or L1); labels are ignored.
- `DecoderStage` (stage 2): fine-tunes the decoder only. The encoder (with its
  BatchNorm statistics) and the classifier are frozen and run in inference
  mode; the bottleneck and pooling indices are cut from the graph, so no
  encoder gradient is computed. The classifier's gradients train the decoder.
"""

import dataclasses
import os

import tensorflow as tf

from s2s_tf import constants
from s2s_tf.config_io import setting
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import preprocessing
from s2s_tf.models import s2s_model
from s2s_tf.models import torch_convert
from s2s_tf.models import vgg16_init
from s2s_tf.train import checkpointing
from s2s_tf.train import losses
from s2s_tf.train import trainer


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the stages get their models.

    Attributes:
      classifier: registry name of the classifier.
      num_classes: classifier outputs.
      classifier_weights: None, "imagenet" or a weights file, for a classifier
        built from the registry.
      classifier_path: a `.keras` [0, 1]-input classifier (e.g. stage 0's output);
        overrides the registry build.
      image_size: (H, W) of the images.
      autoencoder: the autoencoder's shape (stage 1).
      ae_init: VGG16 weights for the encoder at stage 1 ("imagenet" or a file).
      autoencoder_path: the autoencoder stage 2 starts from: a `.keras` file (stage
        1's output, or `convert_main`'s) or the authors' PyTorch checkpoint
        (`torch_convert.CHECKPOINT_SUFFIXES`, converted on load).
    """

    classifier: str = setting(
        "small_cnn", "Classifier architecture.", choices=lambda: classifiers.CLASSIFIERS
    )
    num_classes: int = setting(10, "Number of classes of the classifier.", lower_bound=1)
    classifier_weights: str | None = setting(
        None,
        "None (random init), 'imagenet' (Keras weights; needs internet) or a local "
        ".weights.h5/.keras file.",
    )
    classifier_path: str | None = None
    image_size: tuple = (32, 32)
    autoencoder: ae_lib.AutoencoderConfig = ae_lib.AutoencoderConfig(num_stages=3)
    ae_init: str | None = setting(
        None,
        "Initialise the encoder from VGG16: 'imagenet' or a local VGG16 .weights.h5/.keras file.",
    )
    autoencoder_path: str | None = None


def load_or_build_classifier(config):
    """The [0, 1]-input classifier: from `classifier_path` if given, else the registry."""
    if config.classifier_path:
        return s2s_model.load_keras(config.classifier_path, "classifier model")
    return classifiers.build_classifier_with_preprocessing(
        config.classifier, (*config.image_size, 3), config.num_classes, config.classifier_weights
    )


# Stateless layers, shared: [0, 1] <-> the autoencoder's normalised space.
_normalize = preprocessing.Normalize(name="ae_normalize")
_denormalize = preprocessing.Denormalize(name="ae_denormalize")


class ClassifierStage(trainer.Stage):
    """Stage 0: supervised training of the classifier on [0, 1] images."""

    name = "stage0"
    train_keys = ("loss", "accuracy")
    eval_keys = ("loss", "accuracy")

    def __init__(self, config):
        self.config = config

    def build(self):
        self.classifier = load_or_build_classifier(self.config)

    @property
    def trainable_variables(self):
        return self.classifier.trainable_variables

    def checkpoint_items(self):
        return {"classifier": self.classifier}

    def regularization_losses(self):
        return list(self.classifier.losses)

    def _outputs(self, images, labels, training):
        logits = self.classifier(images, training=training)
        return {
            "loss": losses.cross_entropy(labels, logits),
            "accuracy": losses.correct(labels, logits),
        }

    def train_outputs(self, images, labels):
        return self._outputs(images, labels, training=True)

    def eval_outputs(self, images, labels):
        return self._outputs(images, labels, training=False)

    def summaries(self, images, labels, step):
        _weight_histograms(self.classifier)
        _input_gradient_histogram(self.classifier, images, labels, "classifier")

    def save_final(self, directory):
        path = os.path.join(directory, constants.CLASSIFIER_FILE)
        return [checkpointing.save_keras_atomic(self.classifier, path)]


class ReconstructionStage(trainer.Stage):
    """Stage 1: the autoencoder learns to reconstruct images (labels unused).

    Args:
      config: a `ModelConfig`.
      loss: "mse" or "l1", computed in the autoencoder's normalised space.
      with_classifier: also evaluate the classifier alone and behind the
        autoencoder (needs a classifier in `config`).
    """

    name = "stage1"
    train_keys = ("loss", "psnr")

    def __init__(self, config, loss="mse", with_classifier=False):
        self.config, self.loss, self.with_classifier = config, loss, with_classifier
        self.eval_keys = ("loss", "psnr") + (
            ("accuracy_classifier", "accuracy_defended") if with_classifier else ()
        )

    def build(self):
        shape = (*self.config.image_size, 3)
        self.autoencoder = ae_lib.build_autoencoder(self.config.autoencoder, input_shape=shape)
        if self.config.ae_init:
            vgg16_init.init_encoder_from_vgg16(self.autoencoder, self.config.ae_init)
        self.classifier = load_or_build_classifier(self.config) if self.with_classifier else None

    @property
    def trainable_variables(self):
        return self.autoencoder.trainable_variables

    def checkpoint_items(self):
        return {"autoencoder": self.autoencoder}

    def _outputs(self, images, training):
        target = _normalize(images)
        reconstruction = self.autoencoder(target, training=training)
        return reconstruction, {
            "loss": losses.reconstruction_loss(target, reconstruction, self.loss),
            "psnr": losses.psnr(images, _denormalize(reconstruction)),
        }

    def train_outputs(self, images, labels):
        return self._outputs(images, training=True)[1]

    def eval_outputs(self, images, labels):
        reconstruction, outputs = self._outputs(images, training=False)
        if self.classifier is not None:
            clean = self.classifier(images, training=False)
            defended = self.classifier(_denormalize(reconstruction), training=False)
            outputs["accuracy_classifier"] = losses.correct(labels, clean)
            outputs["accuracy_defended"] = losses.correct(labels, defended)
        return outputs

    def summaries(self, images, labels, step):
        reconstruction = _denormalize(self.autoencoder(_normalize(images), training=False))
        _image_pairs(images, reconstruction)
        _weight_histograms(self.autoencoder)
        if self.classifier is not None:
            defended = s2s_model.build_s2s_model(self.autoencoder, self.classifier)
            _input_gradient_histogram(defended, images, labels, "defended")

    def save_final(self, directory):
        path = os.path.join(directory, constants.AUTOENCODER_FILE)
        return [checkpointing.save_keras_atomic(self.autoencoder, path)]


class DecoderStage(trainer.Stage):
    """Stage 2: decoder-only fine-tuning with the frozen classifier's gradients.

    Args:
      config: a `ModelConfig` with `autoencoder_path` (stage 1's model) and a
        pretrained classifier (`classifier_path`, or registry weights).
      loss: "xent" (cross-entropy to the labels) or "kl" (KL divergence to the
        classifier's predictions on the clean image; needs no labels).
      reconstruction_weight: weight of an added reconstruction term (0: none).
      reconstruction_loss: "mse" or "l1" for that term.
    """

    name = "stage2"
    train_keys = ("loss", "task_loss", "reconstruction", "accuracy_defended")
    eval_keys = ("task_loss", "psnr", "accuracy_classifier", "accuracy_defended")

    def __init__(self, config, loss="xent", reconstruction_weight=0.0, reconstruction_loss="mse"):
        if loss not in losses.STAGE2_LOSSES:
            raise ValueError(f"stage-2 loss must be one of {losses.STAGE2_LOSSES}, got {loss!r}")
        if reconstruction_weight < 0:
            raise ValueError(f"reconstruction_weight must be >= 0, got {reconstruction_weight}")
        self.config, self.loss = config, loss
        self.reconstruction_weight = reconstruction_weight
        self.reconstruction_loss = reconstruction_loss

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
        self.classifier = load_or_build_classifier(self.config)
        # Frozen parts: no trainable variables, inference-mode BatchNorm.
        ae_lib.get_encoder(self.autoencoder).trainable = False
        self.classifier.trainable = False
        self.decoder = ae_lib.get_decoder(self.autoencoder)

    @property
    def trainable_variables(self):
        return self.decoder.trainable_variables

    def checkpoint_items(self):
        return {"autoencoder": self.autoencoder, "classifier": self.classifier}

    def _task_loss(self, images, labels, logits):
        if self.loss == "xent":
            return losses.cross_entropy(labels, logits)
        reference = self.classifier(images, training=False)
        return losses.kl_to_reference(reference, logits)

    def train_outputs(self, images, labels):
        target = _normalize(images)
        reconstruction = ae_lib.decoder_only_forward(self.autoencoder, target, training=True)
        logits = self.classifier(_denormalize(reconstruction), training=False)
        task = self._task_loss(images, labels, logits)
        recon = losses.reconstruction_loss(target, reconstruction, self.reconstruction_loss)
        return {
            "loss": task + self.reconstruction_weight * recon,
            "task_loss": task,
            "reconstruction": recon,
            "accuracy_defended": losses.correct(labels, logits),
        }

    def eval_outputs(self, images, labels):
        reconstruction = _denormalize(self.autoencoder(_normalize(images), training=False))
        logits = self.classifier(reconstruction, training=False)
        return {
            "task_loss": self._task_loss(images, labels, logits),
            "psnr": losses.psnr(images, reconstruction),
            "accuracy_classifier": losses.correct(labels, self.classifier(images, training=False)),
            "accuracy_defended": losses.correct(labels, logits),
        }

    def summaries(self, images, labels, step):
        reconstruction = _denormalize(self.autoencoder(_normalize(images), training=False))
        _image_pairs(images, reconstruction)
        _weight_histograms(self.decoder)
        defended = s2s_model.build_s2s_model(self.autoencoder, self.classifier)
        _input_gradient_histogram(defended, images, labels, "defended")
        _input_gradient_histogram(self.classifier, images, labels, "classifier")

    def save_final(self, directory):
        defended = s2s_model.build_s2s_model(self.autoencoder, self.classifier)
        return [
            checkpointing.save_keras_atomic(
                self.autoencoder, os.path.join(directory, constants.AUTOENCODER_FILE)
            ),
            checkpointing.save_keras_atomic(
                defended, os.path.join(directory, constants.DEFENDED_FILE)
            ),
        ]


def _image_pairs(images, reconstructions):
    """Image summary: inputs above their reconstructions."""
    both = tf.concat([images, tf.clip_by_value(reconstructions, 0.0, 1.0)], axis=1)
    tf.summary.image("input_over_reconstruction", both, max_outputs=8)


def _weight_histograms(model):
    for variable in model.trainable_variables:
        tf.summary.histogram(f"weights/{variable.path}", tf.convert_to_tensor(variable))


def _input_gradient_histogram(model, images, labels, name):
    """Histogram of d(cross-entropy)/d(input) of `model` on the sample batch."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_mean(losses.cross_entropy(labels, model(images, training=False)))
    tf.summary.histogram(f"input_gradients/{name}", tape.gradient(loss, images))
