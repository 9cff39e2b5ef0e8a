"""Tiny saved models for tests and examples: a defended model and a second classifier.

Tests of the binaries need model files on disk; these are seconds to build and
write, and every test that needs them uses this one function.
"""

import os

import keras

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.train import checkpointing


def save_tiny_models(directory, size=(16, 16), num_classes=10, seed=0):
    """Writes a tiny defended model and two classifiers under `directory`.

    Args:
      directory: where to write (`stage2/defended.keras`, `testing.keras`, `lenet5.keras`).
      size: (H, W) of the models' inputs.
      num_classes: classifier outputs.
      seed: Keras' random seed for the weights.

    Returns:
      A dict "defended" / "testing" / "lenet5" -> path.
    """
    keras.utils.set_random_seed(seed)
    ae = _tiny_autoencoder(size)
    paths = {}
    for name in ("testing", "lenet5"):
        classifier = classifiers.build_classifier_with_preprocessing(name, size, num_classes)
        paths[name] = checkpointing.save_keras_atomic(
            classifier, os.path.join(directory, f"{name}.keras")
        )
    defended = s2s_model.build_s2s_model(ae, s2s_model.load_keras(paths["testing"], "c"))
    paths["defended"] = checkpointing.save_keras_atomic(
        defended, os.path.join(directory, "stage2", "defended.keras")
    )
    return paths


def _tiny_autoencoder(size):
    return ae_lib.build_autoencoder(
        ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))), input_shape=(*size, 3)
    )


def build_tiny_defended(size=(16, 16), num_classes=10, seed=0):
    """A tiny defended model in memory, with its parts (for tests of exports and their views).

    Args:
      size: (H, W) of the models' inputs.
      num_classes: classifier outputs.
      seed: Keras' random seed for the weights.

    Returns:
      A dict "autoencoder" / "classifier" / "defended" (autoencoder -> classifier) /
      "purifier" (the autoencoder from [0, 1] images to [0, 1] images).
    """
    keras.utils.set_random_seed(seed)
    autoencoder = _tiny_autoencoder(size)
    classifier = classifiers.build_classifier_with_preprocessing("testing", size, num_classes)
    return {
        "autoencoder": autoencoder,
        "classifier": classifier,
        "defended": s2s_model.build_s2s_model(autoencoder, classifier),
        "purifier": s2s_model.build_purifier(autoencoder, (*size, 3)),
    }
