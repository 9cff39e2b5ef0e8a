"""What the training stages share: where models come from, BatchNorm re-estimation, summaries.

- `ModelConfig` and `load_or_build_classifier`: the models a stage starts from.
- `RecalibratedStage`: every stage that trains BatchNorm layers re-estimates
  their statistics on training data (`recalibrate_batch_norm`) before its final
  model is saved: moving averages lag the weights (momentum 0.99 remembers ~100
  older steps), which costs a short run accuracy in inference mode.
- `normalize` / `denormalize`: [0, 1] images <-> the autoencoder's normalised space.
- TensorBoard helpers for the stages' image and histogram summaries.
"""

import dataclasses

import keras
import tensorflow as tf
from absl import logging

from s2s_tf import data as data_lib
from s2s_tf.config_io import setting
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import preprocessing
from s2s_tf.models import s2s_model
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
      forward: callable(batch) running the layers in training mode.
      layers: the BatchNormalization layers to re-estimate.
      batches: an iterable of batches (image batches, or what `forward` takes).

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
        for batch in batches:
            step(batch)
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


class RecalibratedStage(trainer.Stage):
    """A stage that re-estimates its trained BatchNorm layers before the final save.

    Subclasses set `recalibration` (a `Recalibration`, or None for none) and
    define `_bn_model()` and `_bn_forward(images, labels)`, which runs that
    model's BatchNorm layers in training mode on a batch of [0, 1] images as
    training feeds them (e.g. perturbed by an adversarial objective's attack).
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
        iterators = [iter(batches)]
        try:
            used = recalibrate_batch_norm(
                lambda batch: self._bn_forward(*batch), layers, iterators[0]
            )
        finally:
            data_lib.release_in_background(iterators)
        logging.info("%s: BatchNorm re-estimated on %d batches", self.name, used)
        self._recalibrated = len(layers)
        return self._recalibrated


# Stateless layers, shared: [0, 1] <-> the autoencoder's normalised space.
normalize = preprocessing.Normalize(name="ae_normalize")
denormalize = preprocessing.Denormalize(name="ae_denormalize")


def image_pairs(images, reconstructions):
    """Image summary: inputs above their reconstructions."""
    both = tf.concat([images, tf.clip_by_value(reconstructions, 0.0, 1.0)], axis=1)
    tf.summary.image("input_over_reconstruction", both, max_outputs=8)


def weight_histograms(model):
    for variable in model.trainable_variables:
        tf.summary.histogram(f"weights/{variable.path}", tf.convert_to_tensor(variable))


def input_gradient_histogram(model, images, labels, name):
    """Histogram of d(cross-entropy)/d(input) of `model` on the sample batch."""
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_mean(losses.cross_entropy(labels, model(images, training=False)))
    tf.summary.histogram(f"input_gradients/{name}", tape.gradient(loss, images))
