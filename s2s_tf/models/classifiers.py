"""Classifier registry: name -> `ClassifierSpec`, and builders returning logits.

Every classifier maps its own *preprocessed* input to logits (no softmax), so
losses and attacks can use `from_logits=True` and margins. The preprocessing
each one expects is recorded in its spec; `build_classifier_with_preprocessing`
prepends it so the model takes float32 RGB images in [0, 1].

Keras Applications models are built with `include_top=True` and
`classifier_activation=None`. AlexNet is not part of Keras; it is built here
with the exact torchvision topology. It has no Keras ImageNet weights: train it,
or load a local weights file (e.g. converted from torchvision; the Flatten
follows PyTorch's channels-first order, so only kernel transposes are needed).

With `weights="imagenet"` Keras' EfficientNet has an extra rescaling layer, so
save a fine-tuned ImageNet EfficientNet as a whole `.keras` model, not weights.
"""

import dataclasses
import functools
import os
from collections.abc import Callable

import keras
import numpy as np
from keras import layers
from keras import ops

from s2s_tf.models.preprocessing import PREPROCESS_MODES
from s2s_tf.models.preprocessing import Preprocess

# (input_shape (H, W, C), num_classes, weights None or "imagenet", name) -> logits model.
Builder = Callable[[tuple[int, int, int], int, str | None, str], keras.Model]


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """How to build one classifier and what it expects as input.

    Attributes:
      name: registry key.
      builder: callable `(input_shape, num_classes, weights, name) -> keras.Model`.
      input_size: default input (height, width).
      preprocessing: a `Preprocess` mode mapping [0, 1] RGB to the model's input.
      min_size: smallest height/width the topology accepts.
      imagenet_weights: whether Keras ships ImageNet weights for it.
      description: one line for listings and reports.
      imagenet_sizes: square sizes, besides `input_size`, that Keras accepts
        with ImageNet weights and the top layers.
    """

    name: str
    builder: Builder
    input_size: tuple[int, int]
    preprocessing: str
    min_size: int
    imagenet_weights: bool
    description: str
    imagenet_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        if self.preprocessing not in PREPROCESS_MODES:
            raise ValueError(f"{self.name}: unknown preprocessing {self.preprocessing!r}.")


@keras.saving.register_keras_serializable(package="s2s_tf")
class AdaptiveAveragePooling2D(keras.layers.Layer):
    """PyTorch's `AdaptiveAvgPool2d` for channels-last inputs with static H, W.

    Output bin i along an axis of length n averages input indices
    floor(i * n / out) .. ceil((i + 1) * n / out) - 1, exactly as PyTorch does,
    so bins overlap when n is not a multiple of out and inputs smaller than the
    output are repeated. It is computed as two fixed averaging matrices applied
    with one einsum, which needs no dynamic slicing and exports cleanly.

    Args:
      output_size: int or (height, width) of the output.
      **kwargs: passed to `keras.layers.Layer`.
    """

    def __init__(self, output_size, **kwargs):
        super().__init__(**kwargs)
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = tuple(int(s) for s in output_size)
        if len(self.output_size) != 2 or min(self.output_size) < 1:
            raise ValueError(f"output_size must be two positive ints, got {output_size}.")

    @staticmethod
    def pooling_matrix(in_size, out_size):
        """Returns the [out_size, in_size] matrix of PyTorch's adaptive bins."""
        matrix = np.zeros((out_size, in_size), np.float32)
        for i in range(out_size):
            start = (i * in_size) // out_size
            end = -(-((i + 1) * in_size) // out_size)  # ceil without floats
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix

    def build(self, input_shape):
        if input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                f"AdaptiveAveragePooling2D needs static height and width, got {input_shape}."
            )
        self.built = True

    def call(self, inputs):
        rows, cols = (
            ops.convert_to_tensor(self.pooling_matrix(n, out), dtype=inputs.dtype)
            for n, out in zip(inputs.shape[1:3], self.output_size, strict=True)
        )
        return ops.einsum("ih,bhwc,jw->bijc", rows, inputs, cols)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.output_size, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"output_size": list(self.output_size)})
        return config


def _build_keras_app(app_name, input_shape, num_classes, weights, name):
    """Builds `keras.applications.<app_name>` with a linear (logits) top."""
    constructor = getattr(keras.applications, app_name)
    return constructor(
        include_top=True,
        weights=weights,
        input_shape=input_shape,
        classes=num_classes,
        classifier_activation=None,
        name=name,
    )


def _build_alexnet(input_shape, num_classes, weights, name):
    """torchvision's AlexNet; layer names follow its state-dict indices."""
    del weights  # No Keras ImageNet weights; checked in build_classifier.
    inputs = keras.Input(input_shape)
    x = inputs
    # (torchvision index, filters, kernel, stride, padding, max-pool after).
    features = [
        (0, 64, 11, 4, 2, True),
        (3, 192, 5, 1, 2, True),
        (6, 384, 3, 1, 1, False),
        (8, 256, 3, 1, 1, False),
        (10, 256, 3, 1, 1, True),
    ]
    for index, filters, kernel, stride, pad, pool in features:
        # Explicit zero padding reproduces PyTorch's symmetric padding, which
        # Keras' padding="same" does not for strided convolutions.
        x = layers.ZeroPadding2D(pad, name=f"features_{index}_pad")(x)
        x = layers.Conv2D(filters, kernel, strides=stride, name=f"features_{index}")(x)
        x = layers.ReLU(name=f"features_{index + 1}")(x)
        if pool:
            x = layers.MaxPooling2D(3, strides=2, name=f"features_{index + 2}")(x)
    x = AdaptiveAveragePooling2D((6, 6), name="avgpool")(x)
    # Flatten in PyTorch's (C, H, W) order so torchvision weights port directly.
    x = layers.Permute((3, 1, 2), name="to_channels_first")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="classifier_0")(x)
    x = layers.Dense(4096, activation="relu", name="classifier_1")(x)
    x = layers.Dropout(0.5, name="classifier_3")(x)
    x = layers.Dense(4096, activation="relu", name="classifier_4")(x)
    outputs = layers.Dense(num_classes, name="classifier_6")(x)
    return keras.Model(inputs, outputs, name=name)


def _build_small_cnn(input_shape, num_classes, weights, name):
    """Three blocks of 2x (conv3x3 + BN + ReLU) + max-pool, then GAP + Dense."""
    del weights
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((32, 64, 128), start=1):
        for conv in (1, 2):
            prefix = f"block{block}_conv{conv}"
            # No bias: the following BatchNorm's offset makes it redundant.
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=prefix)(x)
            x = layers.BatchNormalization(name=f"{prefix}_bn")(x)
            x = layers.ReLU(name=f"{prefix}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    outputs = layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _build_lenet5(input_shape, num_classes, weights, name):
    """LeNet-5 layout (6-16 conv5x5, 120-84 dense) with ReLU and max-pooling."""
    del weights
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(6, 5, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    outputs = layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _build_testing(input_shape, num_classes, weights, name):
    """Two strided convs + GAP + Dense: builds and runs in milliseconds."""
    del weights
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _keras_app(name, app_name, size, preprocessing, min_size, description, **kwargs):
    """The spec of a Keras Applications model (ImageNet weights available)."""
    return ClassifierSpec(
        name=name,
        builder=functools.partial(_build_keras_app, app_name),
        input_size=(size, size),
        preprocessing=preprocessing,
        min_size=min_size,
        imagenet_weights=True,
        description=description,
        **kwargs,
    )


# A registry is a table: its entries share a shape by design.
_SPECS = (
    _keras_app("resnet50", "ResNet50", 224, "caffe", 32, "Keras ResNet50 (Caffe preprocessing)."),
    _keras_app(
        "inception_v3", "InceptionV3", 299, "tf", 75, "Keras InceptionV3 (inputs in [-1, 1])."
    ),
    _keras_app("vgg16", "VGG16", 224, "caffe", 32, "Keras VGG16 (Caffe preprocessing)."),
    _keras_app(
        "mobilenet_v2",
        "MobileNetV2",
        224,
        "tf",
        32,
        "Keras MobileNetV2, alpha 1.0 (inputs in [-1, 1]).",
        # Keras ships top weights for these square sizes.
        imagenet_sizes=(96, 128, 160, 192, 224),
    ),
    _keras_app(
        "efficientnet_b0",
        "EfficientNetB0",
        224,
        "raw255",
        32,
        "Keras EfficientNetB0 (normalises [0, 255] inputs itself).",
    ),
    ClassifierSpec(
        name="alexnet",
        builder=_build_alexnet,
        input_size=(224, 224),
        preprocessing="torch",
        # Smallest size whose last max-pool still sees a 3x3 map.
        min_size=63,
        imagenet_weights=False,
        description="torchvision AlexNet topology; no Keras ImageNet weights exist.",
    ),
    ClassifierSpec(
        name="small_cnn",
        builder=_build_small_cnn,
        input_size=(32, 32),
        preprocessing="tf",
        min_size=8,
        imagenet_weights=False,
        description="Small BatchNorm CNN for 28-32 px data (Fashion-MNIST, CIFAR-10).",
    ),
    ClassifierSpec(
        name="lenet5",
        builder=_build_lenet5,
        input_size=(32, 32),
        preprocessing="tf",
        min_size=16,
        imagenet_weights=False,
        description="LeNet-5-style CNN for 28-32 px data.",
    ),
    ClassifierSpec(
        name="testing",
        builder=_build_testing,
        input_size=(32, 32),
        preprocessing="identity",
        min_size=4,
        imagenet_weights=False,
        description="Tiny two-conv CNN for tests; builds in milliseconds.",
    ),
)

CLASSIFIERS: dict[str, ClassifierSpec] = {spec.name: spec for spec in _SPECS}


def get_spec(name):
    """Returns the `ClassifierSpec` registered under `name`.

    Args:
      name: a key of `CLASSIFIERS`.

    Returns:
      The spec.

    Raises:
      ValueError: for an unknown name, listing the registry.
    """
    try:
        return CLASSIFIERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown classifier {name!r}; registered: {', '.join(sorted(CLASSIFIERS))}."
        ) from None


def _resolve_input_shape(spec, input_shape):
    """Returns (H, W, C) from None, (H, W) or (H, W, C), checking the min size."""
    if input_shape is None:
        input_shape = spec.input_size
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 2:
        shape = (*shape, 3)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (H, W) or (H, W, C), got {input_shape}.")
    if min(shape[:2]) < spec.min_size:
        raise ValueError(
            f"Classifier {spec.name!r} needs inputs of at least {spec.min_size}x"
            f"{spec.min_size} pixels, got {shape[0]}x{shape[1]}."
        )
    return shape


def _check_imagenet(spec, shape, num_classes):
    """Rejects, before any download, requests Keras' ImageNet weights cannot serve."""
    if not spec.imagenet_weights:
        raise ValueError(
            f"No Keras ImageNet weights exist for {spec.name!r}. Train it, or pass a local "
            "file: weights='/path/to/model.weights.h5' or '/path/to/model.keras'."
        )
    if num_classes != 1000:
        raise ValueError(f"weights='imagenet' needs num_classes=1000, got {num_classes}.")
    allowed = [(*spec.input_size, 3)] + [(s, s, 3) for s in spec.imagenet_sizes]
    if shape not in allowed:
        raise ValueError(
            f"weights='imagenet' for {spec.name!r} needs input_shape in {sorted(set(allowed))} "
            f"(Keras fixes the ImageNet top layers to them), got {shape}."
        )


def _load_keras_file(path, spec, shape, num_classes):
    """Loads a whole `.keras` classifier and checks it fits the request."""
    model = keras.saving.load_model(path)
    if any(isinstance(layer, Preprocess) for layer in model.layers):
        raise ValueError(
            f"{path} holds a model with a Preprocess layer (it takes [0, 1] images); "
            "build_classifier expects a bare classifier on preprocessed inputs."
        )
    if tuple(model.input_shape[1:]) != shape or model.output_shape[-1] != num_classes:
        raise ValueError(
            f"{path} holds a model with input {model.input_shape[1:]} and "
            f"{model.output_shape[-1]} classes; requested {shape} and {num_classes} classes "
            f"for {spec.name!r}."
        )
    return model


def build_classifier(name, input_shape=None, num_classes=1000, weights=None, model_name=None):
    """Builds a registered classifier mapping preprocessed images to logits.

    Args:
      name: a key of `CLASSIFIERS`.
      input_shape: (H, W) or (H, W, C); defaults to the spec's size with 3 channels.
      num_classes: number of output logits.
      weights: None (random init), "imagenet" (Keras' ImageNet weights,
        downloaded on first use), or a local path to a `.weights.h5`/`.h5`
        file (loaded with `model.load_weights`) or a whole `.keras` model.
      model_name: name of the returned model; defaults to `name`. Ignored for
        `.keras` files, which keep their saved name.

    Returns:
      An uncompiled `keras.Model` whose outputs are logits of shape
      [batch, num_classes].

    Raises:
      ValueError: for an unknown name, an input below the spec's minimum size,
        an ImageNet request the spec or Keras cannot serve, an unsupported
        file suffix, or a `.keras` model that does not match the request.
      FileNotFoundError: if a local weights path does not exist.
    """
    spec = get_spec(name)
    shape = _resolve_input_shape(spec, input_shape)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    model_name = model_name or spec.name
    if weights is None:
        return spec.builder(shape, num_classes, None, model_name)
    if weights == "imagenet":
        _check_imagenet(spec, shape, num_classes)
        return spec.builder(shape, num_classes, "imagenet", model_name)

    path = os.fspath(weights)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Weights file for {spec.name!r} not found: {path}")
    if path.endswith(".keras"):
        return _load_keras_file(path, spec, shape, num_classes)
    if not path.endswith(".h5"):
        raise ValueError(
            f"Unsupported weights file {path}: expected '.weights.h5', '.h5' or '.keras'."
        )
    model = spec.builder(shape, num_classes, None, model_name)
    model.load_weights(path)
    return model


def build_classifier_with_preprocessing(name, input_shape=None, num_classes=1000, weights=None):
    """Builds a classifier that takes float32 RGB images in [0, 1].

    The model is a `Preprocess` layer (the spec's mode) followed by the
    classifier from `build_classifier`, nested as a sub-model named
    "classifier" so its weights can be saved or swapped on their own.

    Args:
      name: a key of `CLASSIFIERS`.
      input_shape: (H, W) or (H, W, C); defaults to the spec's size with 3 channels.
      num_classes: number of output logits.
      weights: as in `build_classifier`.

    Returns:
      An uncompiled `keras.Model` mapping [0, 1] images to logits.

    Raises:
      ValueError, FileNotFoundError: as in `build_classifier`.
    """
    spec = get_spec(name)
    classifier = build_classifier(name, input_shape, num_classes, weights, model_name="classifier")
    # A loaded `.keras` model keeps its saved name; callers look it up by this one.
    classifier.name = "classifier"
    inputs = keras.Input(classifier.input_shape[1:], name="image")
    x = Preprocess(spec.preprocessing, name="preprocess")(inputs)
    outputs = classifier(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_with_preprocessing")
