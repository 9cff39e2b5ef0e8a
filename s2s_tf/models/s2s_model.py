"""The composite defended model: [0, 1] image -> S2SNet autoencoder -> classifier logits.

Training, evaluation and export all build the defended model with
`build_s2s_model`, so there is one composite in the code base. Its input
contract is the project's: float32 RGB images in [0, 1]; every normalisation
happens inside the graph:

    x in [0, 1] -> Normalize (ImageNet mean/std, the autoencoder's fixed space)
      -> autoencoder -> Denormalize (back to [0, 1] units)
      -> classifier (its own preprocessing inside) -> logits
"""

import os

import keras

# Imported for their registered Keras classes, which `load_keras` needs in safe mode.
from s2s_tf.models import classifiers  # noqa: F401
from s2s_tf.models import layers  # noqa: F401
from s2s_tf.models import preprocessing

AUTOENCODER_NAME = "autoencoder"
CLASSIFIER_NAME = "classifier"


def build_purifier(autoencoder, input_shape, clip=False, name="s2s_purifier"):
    """Wraps the autoencoder to map [0, 1] images to reconstructions in [0, 1] units.

    Args:
      autoencoder: a model from `autoencoder.build_autoencoder` (normalised space).
      input_shape: (H, W, C) of the images.
      clip: clip the reconstruction to [0, 1]. Off by default so gradients pass
        everywhere (attacks and the gradient analysis need them); serving turns
        it on for images meant to be viewed.
      name: model name.

    Returns:
      A functional `keras.Model`.
    """
    inputs = keras.Input(input_shape, name="image")
    x = preprocessing.Normalize(name="ae_normalize")(inputs)
    x = autoencoder(x)
    x = preprocessing.Denormalize(name="ae_denormalize")(x)
    if clip:
        x = keras.layers.ReLU(max_value=1.0, name="clip")(x)
    return keras.Model(inputs, x, name=name)


def build_s2s_model(autoencoder, classifier, input_shape=None, name="s2s_defended"):
    """Builds the defended classifier: autoencoder in front of a [0, 1]-input classifier.

    Args:
      autoencoder: a model from `autoencoder.build_autoencoder`; it is reused
        (shared weights), not copied.
      classifier: a model mapping [0, 1] images to logits, e.g. from
        `classifiers.build_classifier_with_preprocessing`.
      input_shape: (H, W, C); default: the classifier's input shape.
      name: model name.

    Returns:
      A functional `keras.Model` [0, 1] images -> logits, with the autoencoder
      and classifier nested under the names "autoencoder" and "classifier"
      (`get_autoencoder`, `get_classifier`).

    Raises:
      ValueError: when the autoencoder's and classifier's channels disagree.
    """
    input_shape = tuple(input_shape or classifier.input_shape[1:])
    ae_channels = autoencoder.input_shape[-1]
    if ae_channels != input_shape[-1]:
        raise ValueError(
            f"autoencoder takes {ae_channels} channels but the images have {input_shape[-1]}"
        )
    inputs = keras.Input(input_shape, name="image")
    x = preprocessing.Normalize(name="ae_normalize")(inputs)
    x = _renamed(autoencoder, AUTOENCODER_NAME)(x)
    x = preprocessing.Denormalize(name="ae_denormalize")(x)
    logits = _renamed(classifier, CLASSIFIER_NAME)(x)
    return keras.Model(inputs, logits, name=name)


def _renamed(model, name):
    """Nests `model` under a fixed name (a wrapper sharing its weights) so it can be found."""
    if model.name != name:
        inputs = keras.Input(model.input_shape[1:], name=f"{name}_input")
        model = keras.Model(inputs, model(inputs), name=name)
    return model


def get_autoencoder(s2s_model):
    """The autoencoder nested in a model from `build_s2s_model` (normalised space)."""
    return s2s_model.get_layer(AUTOENCODER_NAME)


def get_classifier(s2s_model):
    """The [0, 1]-input classifier nested in a model from `build_s2s_model`."""
    return s2s_model.get_layer(CLASSIFIER_NAME)


def load_keras(path, what="model"):
    """Loads one of this project's `.keras` models with `safe_mode=True`.

    Args:
      path: the `.keras` file (an autoencoder, classifier or defended model).
      what: what the file should hold, for the error message.

    Raises:
      FileNotFoundError: naming `what` and the path.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return keras.saving.load_model(path, compile=False, safe_mode=True)
