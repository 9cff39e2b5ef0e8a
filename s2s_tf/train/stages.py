"""The three training stages of S2SNet as `trainer.Stage`s.

- `ClassifierStage` (stage 0): trains a registry classifier with cross-entropy,
  for data that has no pretrained classifier.
- `ReconstructionStage` (stage 1): unsupervised reconstruction in the
  autoencoder's normalised space (MSE or L1); labels are ignored.
- `DecoderStage` (stage 2): fine-tunes the decoder only. The encoder (with its
  BatchNorm statistics) and the classifier are frozen and run in inference
  mode; the bottleneck and pooling indices are cut from the graph, so no
  encoder gradient is computed. The classifier's gradients train the decoder.

Every stage that trains BatchNorm layers re-estimates their statistics on
training data (`recalibrate_batch_norm`) before its final model is saved: moving
averages lag the weights (momentum 0.99 remembers ~100 older steps), which costs
a short run accuracy in inference mode.
"""

import dataclasses
import os

import keras
import tensorflow as tf
from absl import logging

from s2s_tf import constants
from s2s_tf import data as data_lib
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


@dataclasses.dataclass(frozen=True)
class Recalibration:
    """Where the final BatchNorm statistics come from.

    Attributes:
      data: the training split, augmented as in training (the weights were
        trained with those statistics: 0.2 dB better PSNR than plain images).
      batches: how many batches are averaged; 0 keeps the moving averages.
    """

    data: data_lib.DataConfig
    batches: int = 100


def trained_batch_norms(model):
    """The BatchNormalization layers of `model` (nested models included) that train."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.extend([layer] if layer.trainable else [])
        elif hasattr(layer, "layers"):
            found.extend(trained_batch_norms(layer))
    return found


def recalibrate_batch_norm(forward, layers, batches):
    """Replaces the moving statistics of `layers` by their average over `batches`.

    Each batch runs through `forward` with momentum 0, so the layers store that
    batch's mean and variance; the result is their plain average (as PyTorch's
    `update_bn`), not an exponential average over changing weights.

    Args:
      forward: callable(images) running the layers in training mode.
      layers: the BatchNormalization layers to re-estimate.
      batches: an iterable of image batches.

    Returns:
      The number of batches used (0 when `layers` is empty).

    Raises:
      ValueError: when `batches` is empty.
    """
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums, count = [[0.0, 0.0] for _ in layers], 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # read when traced: each call stores its batch's moments
        step = tf.function(forward)
        for images in batches:
            step(images)
            for total, layer in zip(sums, layers, strict=True):
                total[0] += keras.ops.convert_to_numpy(layer.moving_mean)
                total[1] += keras.ops.convert_to_numpy(layer.moving_variance)
            count += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if not count:
        raise ValueError("no batches to re-estimate the BatchNorm statistics from")
    for (mean, variance), layer in zip(sums, layers, strict=True):
        layer.moving_mean.assign(mean / count)
        layer.moving_variance.assign(variance / count)
    return count


class _RecalibratedStage(trainer.Stage):
    """A stage that re-estimates its trained BatchNorm layers before the final save.

    Subclasses set `recalibration` (a `Recalibration`, or None for none) and
    define `_bn_model()` and `_bn_forward(images)`, which runs that model's
    BatchNorm layers in training mode on [0, 1] images.
    """

    recalibration = None
    _recalibrated = None

    def recalibrate_batch_norm(self):
        """Re-estimates the BatchNorm statistics once; returns how many layers (0: none)."""
        if self._recalibrated is not None:
            return self._recalibrated
        config, layers = self.recalibration, trained_batch_norms(self._bn_model())
        self._recalibrated = 0
        if config is None or not config.batches or not layers:
            return 0
        batches = data_lib.make_dataset_fn(config.data, training=True)(None).take(config.batches)
        used = recalibrate_batch_norm(self._bn_forward, layers, batches.map(lambda x, y: x))
        logging.info("%s: BatchNorm re-estimated on %d batches", self.name, used)
        self._recalibrated = len(layers)
        return self._recalibrated


# Stateless layers, shared: [0, 1] <-> the autoencoder's normalised space.
_normalize = preprocessing.Normalize(name="ae_normalize")
_denormalize = preprocessing.Denormalize(name="ae_denormalize")


class ClassifierStage(_RecalibratedStage):
    """Stage 0: supervised training of the classifier on [0, 1] images.

    Args:
      config: a `ModelConfig`.
      recalibration: a `Recalibration` for the final BatchNorm statistics, or None.
    """

    name = "stage0"
    train_keys = ("loss", "accuracy")
    eval_keys = ("loss", "accuracy")

    def __init__(self, config, recalibration=None):
        self.config, self.recalibration = config, recalibration

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

    def _bn_model(self):
        return self.classifier

    def _bn_forward(self, images):
        return self.classifier(images, training=True)

    def save_final(self, directory):
        self.recalibrate_batch_norm()
        path = os.path.join(directory, constants.CLASSIFIER_FILE)
        return [checkpointing.save_keras_atomic(self.classifier, path)]


class ReconstructionStage(_RecalibratedStage):
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

    def _bn_model(self):
        return self.autoencoder

    def _bn_forward(self, images):
        return self.autoencoder(_normalize(images), training=True)

    def save_final(self, directory):
        self.recalibrate_batch_norm()
        path = os.path.join(directory, constants.AUTOENCODER_FILE)
        return [checkpointing.save_keras_atomic(self.autoencoder, path)]


class DecoderStage(_RecalibratedStage):
    """Stage 2: decoder-only fine-tuning with the frozen classifier's gradients.

    Args:
      config: a `ModelConfig` with `autoencoder_path` (stage 1's model) and a
        pretrained classifier (`classifier_path`, or registry weights).
      loss: "kl" (KL divergence to the classifier's predictions on the clean
        image; needs no labels, so any pretrained classifier can be defended on
        unlabelled images) or "xent" (cross-entropy to the labels).
      reconstruction_weight: weight of an added reconstruction term (0: none).
      reconstruction_loss: "mse" or "l1" for that term.
      recalibration: a `Recalibration` for the decoder's final BatchNorm
        statistics, or None.
    """

    name = "stage2"
    train_keys = ("loss", "task_loss", "reconstruction", "accuracy_defended")
    eval_keys = ("task_loss", "psnr", "accuracy_classifier", "accuracy_defended")

    def __init__(
        self,
        config,
        loss="kl",
        reconstruction_weight=1.0,
        reconstruction_loss="mse",
        recalibration=None,
    ):
        if loss not in losses.STAGE2_LOSSES:
            raise ValueError(f"stage-2 loss must be one of {losses.STAGE2_LOSSES}, got {loss!r}")
        if reconstruction_weight < 0:
            raise ValueError(f"reconstruction_weight must be >= 0, got {reconstruction_weight}")
        self.config, self.loss = config, loss
        self.reconstruction_weight = reconstruction_weight
        self.reconstruction_loss = reconstruction_loss
        self.recalibration = recalibration

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

    def _bn_model(self):
        return self.decoder

    def _bn_forward(self, images):
        return ae_lib.decoder_only_forward(self.autoencoder, _normalize(images), training=True)

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
