"""The composite defended model: [0, 1] image -> S2SNet autoencoder -> classifier logits.

Training, evaluation and export all build the defended model with
`build_s2s_model`, so there is one composite in the code base. Its input
contract is the project's: float32 RGB images in [0, 1]; every normalisation
happens inside the graph:

    x in [0, 1] -> Normalize (ImageNet mean/std, the autoencoder's fixed space)
      -> autoencoder -> Denormalize (back to [0, 1] units) -> clip to [0, 1]
      -> classifier (its own preprocessing inside) -> logits

The clipped reconstruction is the purifier's output (`build_purifier`), so the
defended model is exactly classifier(purifier(x)): the exported `purify` and
`classify_undefended` signatures compose to `serving_default`, and training's
stage 2 (`image_from_reconstruction`), evaluation and the report's images see
the same images. The clip's gradient is zero where a reconstruction leaves
[0, 1]; that is the deployed function, which attacks must see (the BPDA and
surrogate threat models approximate its backward pass).
"""

import hashlib
import os

import keras

# Imported for their registered Keras classes, which `load_keras` needs in safe mode.
from s2s_tf.models import classifiers  # noqa: F401
from s2s_tf.models import layers  # noqa: F401
from s2s_tf.models import preprocessing

AUTOENCODER_NAME = "autoencoder"
CLASSIFIER_NAME = "classifier"
CLIP_NAME = "clip"


def clip_layer(name=CLIP_NAME):
    """The layer that clips reconstructions to [0, 1]: a stock layer, safe to save and load."""
    return keras.layers.ReLU(max_value=1.0, name=name)


# For code that runs the autoencoder by itself (training steps); layers without weights.
_DENORMALIZE = preprocessing.Denormalize(name="ae_denormalize")
_CLIP = clip_layer()


def image_from_reconstruction(reconstruction):
    """The [0, 1] image the classifier sees, from an autoencoder output (normalised space).

    The same two steps, in the same order, as inside `build_purifier` and
    `build_s2s_model`, for code that runs the autoencoder by itself (training).
    """
    return _CLIP(_DENORMALIZE(reconstruction))


def _purified(inputs, autoencoder):
    """Normalize -> autoencoder -> Denormalize -> clip, with fresh layers for one model."""
    x = preprocessing.Normalize(name="ae_normalize")(inputs)
    x = preprocessing.Denormalize(name="ae_denormalize")(autoencoder(x))
    return clip_layer()(x)


def build_purifier(autoencoder, input_shape, name="s2s_purifier"):
    """Wraps the autoencoder to map [0, 1] images to reconstructions clipped to [0, 1].

    Args:
      autoencoder: a model from `autoencoder.build_autoencoder` (normalised space).
      input_shape: (H, W, C) of the images.
      name: model name.

    Returns:
      A functional `keras.Model`; `build_s2s_model`'s classifier sees its output.
    """
    inputs = keras.Input(input_shape, name="image")
    return keras.Model(inputs, _purified(inputs, autoencoder), name=name)


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
      A functional `keras.Model` [0, 1] images -> logits, equal to
      classifier(build_purifier(autoencoder)(x)), with the autoencoder and
      classifier nested under the names "autoencoder" and "classifier"
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
    x = _purified(inputs, _renamed(autoencoder, AUTOENCODER_NAME))
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


def is_composite(model):
    """Whether `model` nests an autoencoder and a classifier as `build_s2s_model` names them."""
    names = {layer.name for layer in getattr(model, "layers", ())}
    return {AUTOENCODER_NAME, CLASSIFIER_NAME} <= names


def load_keras(path, what="model"):
    """Loads one of this project's `.keras` models with `safe_mode=True`.

    A defended composite comes back rebuilt by `build_s2s_model` from its two
    saved parts (same weights, same name and input shape), so a file written by
    an older build (e.g. before the reconstruction was clipped) computes the
    same function as one built today.

    Args:
      path: the `.keras` file (an autoencoder, classifier or defended model).
      what: what the file should hold, for the error message.

    Raises:
      FileNotFoundError: naming `what` and the path.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    if not is_composite(model):
        return model
    return build_s2s_model(
        get_autoencoder(model), get_classifier(model), model.input_shape[1:], name=model.name
    )


def file_sha256(path):
    """The SHA-256 hex digest of a file's bytes: a model file's identity, whatever its path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(paths):
    """{path as given: SHA-256} of the given files (None entries are skipped).

    Raises:
      FileNotFoundError: naming a path that does not exist.
    """
    out = {}
    for path in paths:
        if not path:
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: {path}")
        out[path] = file_sha256(path)
    return out
