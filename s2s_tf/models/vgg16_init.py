"""Initialises the autoencoder's encoder from Keras VGG16 convolution weights.

The authors transplanted ImageNet VGG16 weights into the SegNet encoder before
stage 1. Keras' VGG16 weights expect "caffe" input (BGR, 0-255, mean
subtracted) while the autoencoder reads ImageNet-normalised RGB, so by default
the first convolution is rewritten to compute the same function on the
autoencoder's input: channels reordered, kernels scaled by 255*std, and the
mean difference folded into the bias. This is exact away from the image
border; at the border the zero padding of the two spaces differs.
"""

import os

import keras
import numpy as np

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import preprocessing


def load_vgg16(weights="imagenet"):
    """Returns a Keras VGG16 (convolutional part is what matters) from `weights`.

    Args:
      weights: "imagenet" (downloads through Keras; needs internet), a path to a
        `.keras` model or a `.weights.h5`/`.h5` weights file of a VGG16 with or
        without its top, or a `keras.Model` that already is a VGG16.

    Returns:
      A `keras.Model` with layers named `block{s}_conv{j}`.

    Raises:
      FileNotFoundError: when a path does not exist.
      ValueError: when the file holds no VGG16 weights.
    """
    if isinstance(weights, keras.Model):
        return weights
    if weights == "imagenet":
        return keras.applications.VGG16(include_top=False, weights="imagenet")
    path = os.fspath(weights)
    if not os.path.exists(path):
        raise FileNotFoundError(f"VGG16 weights file not found: {path}")
    if path.endswith(".keras"):
        return keras.saving.load_model(path, compile=False)
    errors = []
    for include_top in (False, True):
        try:
            return keras.applications.VGG16(include_top=include_top, weights=path)
        except (ValueError, KeyError, OSError) as e:  # try the other layout
            errors.append(f"include_top={include_top}: {e}")
    raise ValueError(f"{path} holds no VGG16 weights: " + "; ".join(errors))


def caffe_to_normalized_first_layer(kernel, bias, mean=None, std=None):
    """Rewrites a conv layer that reads caffe input into one that reads normalised RGB.

    With x_n = (x - mean) / std (RGB, x in [0, 1]) and caffe input
    x_c[BGR c] = 255 * x[RGB 2-c] - CAFFE_MEAN_BGR[c], the conv on x_c equals a
    conv on x_n with kernel[..., k, :] = K[..., 2-k, :] * 255 * std[k] and the
    constant part folded into the bias (exact where the kernel sees no padding).

    Args:
      kernel: [kh, kw, 3, out] kernel reading caffe BGR input.
      bias: [out] bias.
      mean: the normalisation mean (default ImageNet, RGB).
      std: the normalisation std (default ImageNet, RGB).

    Returns:
      (kernel, bias) for normalised RGB input.
    """
    mean = np.asarray(preprocessing.IMAGENET_MEAN if mean is None else mean, np.float64)
    std = np.asarray(preprocessing.IMAGENET_STD if std is None else std, np.float64)
    rgb_kernel = np.asarray(kernel, np.float64)[:, :, ::-1, :]
    offset = 255.0 * mean - np.asarray(preprocessing.CAFFE_MEAN_BGR[::-1], np.float64)
    new_kernel = rgb_kernel * (255.0 * std)[None, None, :, None]
    new_bias = np.asarray(bias, np.float64) + np.einsum("hwko,k->o", rgb_kernel, offset)
    return new_kernel.astype(np.float32), new_bias.astype(np.float32)


def init_encoder_from_vgg16(autoencoder, weights="imagenet", adapt_first_layer=True):
    """Copies VGG16 conv kernels and biases into the autoencoder's encoder.

    Encoder conv `conv{s}{j}` receives VGG16's `block{s}_conv{j}`. An
    autoencoder with fewer stages takes the first blocks. BatchNorm layers keep
    their initialisation (VGG16 has none).

    Args:
      autoencoder: a model from `autoencoder.build_autoencoder` with 3 channels.
      weights: see `load_vgg16`.
      adapt_first_layer: rewrite the first conv for the autoencoder's
        normalised RGB input (right for Keras' caffe-mode VGG16 weights); False
        copies it unchanged (for weights already trained on normalised RGB).

    Returns:
      The names of the encoder layers that were initialised.

    Raises:
      ValueError: when the encoder's channels or widths do not match VGG16.
    """
    convs = ae_lib.encoder_conv_layers(autoencoder)
    if convs[0].kernel.shape[2] != 3:
        raise ValueError(
            f"VGG16 initialisation needs a 3-channel autoencoder, got {convs[0].kernel.shape[2]}"
        )
    vgg = load_vgg16(weights)
    copied = []
    for conv in convs:
        vgg_name = f"block{conv.name[4]}_conv{conv.name[5:]}"
        try:
            source = vgg.get_layer(vgg_name)
        except ValueError as e:
            raise ValueError(f"VGG16 has no layer {vgg_name} for encoder layer {conv.name}") from e
        kernel, bias = (np.asarray(w) for w in source.get_weights())
        if kernel.shape != tuple(conv.kernel.shape):
            raise ValueError(
                f"encoder layer {conv.name} has kernel shape {tuple(conv.kernel.shape)} but "
                f"VGG16 {vgg_name} has {kernel.shape}; use the VGG16 stage widths"
            )
        if adapt_first_layer and not copied:
            kernel, bias = caffe_to_normalized_first_layer(kernel, bias)
        conv.set_weights([kernel, bias])
        copied.append(conv.name)
    return copied
