"""In-graph image preprocessing layers.

Every model in s2s_tf takes float32 RGB images in [0, 1] (channels-last) and
does all normalisation inside the graph, so attacks, evaluation and serving
share one input contract. These layers are built only from `keras.ops`, hold
no Python callables and are registered serializable, so models that contain
them save to `.keras`, reload with `safe_mode=True` and export unchanged.

- `Preprocess(mode)` maps [0, 1] images to what a given classifier was trained
  on (the `mode` of `keras.applications.imagenet_utils.preprocess_input`).
- `Normalize` / `Denormalize` move between [0, 1] and the autoencoder's fixed
  normalised space (ImageNet mean/std on [0, 1] RGB).
"""

from collections.abc import Sequence

import keras
from keras import ops

# ImageNet statistics of [0, 1] RGB images, as used by torchvision models and
# by the released S2SNet autoencoder weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-channel means of [0, 255] images in BGR order, as subtracted by the
# original Caffe models (and `preprocess_input(..., mode="caffe")`).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

PREPROCESS_MODES = ("caffe", "tf", "torch", "raw255", "identity")


def _check_mode(mode):
    if mode not in PREPROCESS_MODES:
        raise ValueError(
            f"Unknown preprocessing mode {mode!r}; valid modes are {', '.join(PREPROCESS_MODES)}."
        )


def _check_stats(mean, std):
    """Returns `mean` and `std` as float tuples of equal length.

    Raises:
      ValueError: if the lengths differ or any std is not positive.
    """
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have the same length, got {mean} and {std}.")
    if any(s <= 0.0 for s in std):
        raise ValueError(f"std must be positive, got {std}.")
    return mean, std


def _check_channels(input_shape, num_channels, what):
    channels = input_shape[-1]
    if channels is not None and channels != num_channels:
        raise ValueError(f"{what} expects {num_channels} channels, got input shape {input_shape}.")


@keras.saving.register_keras_serializable(package="s2s_tf")
class Preprocess(keras.layers.Layer):
    """Applies a classifier's own preprocessing to [0, 1] RGB images.

    Modes (inputs are float RGB in [0, 1], channels-last):
      - "caffe": x * 255, RGB -> BGR, minus the BGR ImageNet means
        (ResNet50, VGG16).
      - "tf": x * 255 / 127.5 - 1, i.e. [-1, 1] (InceptionV3, MobileNetV2).
      - "torch": (x - IMAGENET_MEAN) / IMAGENET_STD (torchvision models).
      - "raw255": x * 255 (EfficientNet, whose Keras model normalises inside).
      - "identity": x unchanged.

    Args:
      mode: one of `PREPROCESS_MODES`.
      **kwargs: passed to `keras.layers.Layer`.

    Raises:
      ValueError: for an unknown mode.
    """

    def __init__(self, mode, **kwargs):
        super().__init__(**kwargs)
        _check_mode(mode)
        self.mode = mode

    def build(self, input_shape):
        # Modes with per-channel constants only make sense for RGB; fail at build
        # time rather than with an opaque broadcasting error.
        if self.mode in ("caffe", "torch"):
            _check_channels(input_shape, 3, f"Preprocess(mode={self.mode!r})")
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x * 255.0, axis=-1)
            return x - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=x.dtype)
        if self.mode == "tf":
            return x * 255.0 / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(IMAGENET_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(IMAGENET_STD, dtype=x.dtype)
            return (x - mean) / std
        if self.mode == "raw255":
            return x * 255.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode})
        return config


class _ChannelStats(keras.layers.Layer):
    """Base for layers with fixed per-channel mean and std constants.

    Subclasses define `_transform(x, mean, std)`; `call` casts the input and
    supplies the constants in its dtype.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, **kwargs
    ):
        super().__init__(**kwargs)
        self.mean, self.std = _check_stats(mean, std)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        return self._transform(x, *self._constants(x.dtype))

    def build(self, input_shape):
        _check_channels(input_shape, len(self.mean), type(self).__name__)
        self.built = True

    def _constants(self, dtype):
        mean = ops.convert_to_tensor(self.mean, dtype=dtype)
        std = ops.convert_to_tensor(self.std, dtype=dtype)
        return mean, std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "std": list(self.std)})
        return config


@keras.saving.register_keras_serializable(package="s2s_tf")
class Normalize(_ChannelStats):
    """Maps [0, 1] images to the normalised space: (x - mean) / std.

    Args:
      mean: per-channel means (default: `IMAGENET_MEAN`).
      std: per-channel standard deviations, all positive (default: `IMAGENET_STD`).
      **kwargs: passed to `keras.layers.Layer`.

    Raises:
      ValueError: if mean and std differ in length or a std is not positive.
    """

    @staticmethod
    def _transform(x, mean, std):
        return (x - mean) / std


@keras.saving.register_keras_serializable(package="s2s_tf")
class Denormalize(_ChannelStats):
    """Maps normalised images back to [0, 1] space: x * std + mean.

    The exact inverse of `Normalize` with the same statistics (up to float
    rounding). It does not clip, so gradients pass through unchanged.

    Args:
      mean: per-channel means (default: `IMAGENET_MEAN`).
      std: per-channel standard deviations, all positive (default: `IMAGENET_STD`).
      **kwargs: passed to `keras.layers.Layer`.

    Raises:
      ValueError: if mean and std differ in length or a std is not positive.
    """

    @staticmethod
    def _transform(x, mean, std):
        return x * std + mean
