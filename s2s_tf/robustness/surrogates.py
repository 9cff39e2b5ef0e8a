"""Smooth surrogates of the S2SNet autoencoder for adaptive (BPDA-style) attacks.

The SegNet decoder max-unpools with the encoder's argmax switches: each decoder
value lands at the position the encoder's max came from and zeros fill the rest
of its 2x2 window. The switches are piecewise constant in the input, so the
end-to-end gradient treats them as constants and cannot see the jump in the
reconstruction when one flips (shattered gradients, Athalye et al. 2018).

`soft_routing_purifier` recomputes the autoencoder with the same weights, layer
by layer (BatchNorm in inference mode), but unpools softly: each decoder value
is spread over its window with weights softmax(pre-pool activations / T), taken
from the encoder's feature map entering that pool. The routing then moves
continuously with the input and the gradient also flows into how the switches
would move. As T -> 0 the weights become the hard switches; T = 0 is the hard
routing itself (the real autoencoder). `soft_routing_model_fn` uses the
surrogate as the backward pass of the real defended model (BPDA with a smooth
approximation instead of the identity).
"""

import math

import keras
import tensorflow as tf

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import layers as s2s_layers

DEFAULT_TEMPERATURE = 0.1
# Where the hard pool routes a tied window: its first position in row-major order.
_FIRST_POSITION = ((1.0, 0.0), (0.0, 0.0))


def _check_temperature(temperature):
    """Returns `temperature` as a float; raises ValueError for unusable values."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be finite and >= 0 (0 = hard routing), got {temperature}"
        )
    return float(temperature)


def soft_unpool(values, pre_pool, temperature):
    """Unpools `values` 2x2 with soft switches: softmax(pre_pool / T) over each window.

    A window of four ReLU zeros is an exact tie (common, not a corner case),
    which the hard pool breaks to the first position in row-major order while
    a softmax would split it evenly. So the softmax is blended with that first
    position by a gate 1 - exp(-|max| / T) of the window's max: 0 in an
    all-zero window (hard routing), -> 1 in any other as T -> 0. The blend
    moves continuously as a unit wakes up, and as T -> 0 the weights converge to
    the hard switches in every window. Hot (T above the activations' scale),
    weak windows lean toward their first position like all-zero ones.

    Args:
      values: decoder tensor [N, h, w, C] at the pooled resolution.
      pre_pool: the encoder's feature map entering the matching pool, [N, 2h, 2w, C].
      temperature: softmax temperature > 0, in activation units.

    Returns:
      [N, 2h, 2w, C]: each value times its window's weights (which sum to 1).

    Raises:
      ValueError: unless temperature > 0 (for T = 0 use the hard `MaxUnpool`).
    """
    if _check_temperature(temperature) == 0.0:
        raise ValueError("soft_unpool needs temperature > 0; T = 0 is the hard MaxUnpool")
    shape = tf.shape(pre_pool)
    n, h, w, c = shape[0], shape[1] // 2, shape[2] // 2, shape[3]
    # At least float32: exp(logits / T) in float16 would lose the small weights.
    dtype = tf.float64 if pre_pool.dtype == tf.float64 else tf.float32
    windows = tf.reshape(tf.cast(pre_pool, dtype), [n, h, 2, w, 2, c]) / temperature
    window_max = tf.reduce_max(windows, axis=[2, 4], keepdims=True)
    # Softmax is shift invariant: the max only keeps exp in range, so it needs no gradient.
    probs = tf.exp(windows - tf.stop_gradient(window_max))
    probs /= tf.reduce_sum(probs, axis=[2, 4], keepdims=True)
    gate = -tf.math.expm1(-tf.abs(window_max))
    first = tf.reshape(tf.constant(_FIRST_POSITION, dtype), [1, 1, 2, 1, 2, 1])
    weights = gate * probs + (1.0 - gate) * first
    spread = values[:, :, None, :, None, :] * tf.cast(weights, values.dtype)
    out = tf.reshape(spread, shape)
    out.set_shape(pre_pool.shape)
    return out


def _is_autoencoder(layer):
    """Whether `layer` is a model from `autoencoder.build_autoencoder` (has encoder + decoder)."""
    if not isinstance(layer, keras.Model):
        return False
    names = {sub.name for sub in layer.layers}
    return {ae_lib.ENCODER_NAME, ae_lib.DECODER_NAME, "pad", "crop"} <= names


def _run_encoder(encoder, x):
    """Runs the encoder layer by layer: (bottleneck, {pool name: (pre-pool map, indices)})."""
    pools = {}
    for layer in encoder.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, s2s_layers.MaxPoolWithArgmax):
            pre_pool = x
            x, indices = layer(x)
            pools[layer.name] = (pre_pool, indices)
        else:
            x = layer(x, training=False)
    return x, pools


def _run_decoder(decoder, x, pools, temperature):
    """Runs the decoder layer by layer, unpooling softly (or hard when temperature is 0)."""
    for layer in decoder.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, s2s_layers.MaxUnpool):
            # build_decoder names the mirror of encoder layer "pool{s}" "unpool{s}".
            pool_name = layer.name.removeprefix("un")
            if pool_name not in pools:
                raise ValueError(
                    f"decoder layer {layer.name!r} has no encoder pool named {pool_name!r}; "
                    f"the encoder has {sorted(pools)}"
                )
            pre_pool, indices = pools[pool_name]
            x = (
                layer([x, indices])  # hard routing: the real autoencoder
                if temperature == 0.0
                else soft_unpool(x, pre_pool, temperature)
            )
        else:
            x = layer(x, training=False)
    return x


def _surrogate_autoencoder(autoencoder, x, temperature):
    """The autoencoder's forward pass with soft unpooling, same weights, inference mode."""
    padded = autoencoder.get_layer("pad")(x)
    bottleneck, pools = _run_encoder(ae_lib.get_encoder(autoencoder), padded)
    y = _run_decoder(ae_lib.get_decoder(autoencoder), bottleneck, pools, temperature)
    return autoencoder.get_layer("crop")([y, x])


def _walk(model, x, temperature):
    """Calls `model`'s layers in order, replacing the (nested) autoencoder by its surrogate."""
    if _is_autoencoder(model):
        return _surrogate_autoencoder(model, x, temperature)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            x = _walk(layer, x, temperature)
        else:
            x = layer(x, training=False)
    return x


def _contains_autoencoder(model):
    """Whether `model` is, or nests at any depth, a model from `build_autoencoder`."""
    if _is_autoencoder(model):
        return True
    return any(isinstance(sub, keras.Model) and _contains_autoencoder(sub) for sub in model.layers)


def _check_input(model):
    """A fixed probe image for `model`: its static size, else one no autoencoder must pad."""
    shape = model.input_shape
    if not isinstance(shape, tuple) or len(shape) != 4:
        raise ValueError(f"the purifier must take one [N, H, W, C] input, got {shape}")
    size = 64  # a multiple of 2**5, so even the paper's five stages need no padding
    h, w, c = (size if d is None else d for d in shape[1:])
    return tf.random.stateless_uniform((1, h, w, c), seed=(1, 2))


def soft_routing_purifier(purifier, temperature=DEFAULT_TEMPERATURE, *, check=True):
    """Returns `surrogate(x)`: `purifier` recomputed with soft unpooling in its autoencoder.

    The walk calls the purifier's layers in order (it must be a chain, as
    `s2s_model.build_purifier` makes it, or an autoencoder itself) and the
    autoencoder's pad, encoder, decoder and crop layer by layer with the same
    weights, BatchNorm in inference mode; only the unpooling changes.

    Args:
      purifier: a model from `s2s_model.build_purifier` ([0, 1] -> [0, 1]) or
        from `autoencoder.build_autoencoder` (normalised space).
      temperature: softmax temperature in activation units; 0 is the hard
        routing (the real autoencoder), larger is smoother.
      check: verify once that the walk with hard routing reproduces
        `purifier` (one forward pass on a 1-image batch), so a model of another
        shape fails here rather than yielding a wrong surrogate.

    Returns:
      A callable `x -> surrogate purified images`, usable inside `tf.function`.

    Raises:
      ValueError: for a bad temperature, a purifier without a nested autoencoder,
        or one the walk does not reproduce.
    """
    temperature = _check_temperature(temperature)
    if not isinstance(purifier, keras.Model):
        raise ValueError(f"purifier must be a keras.Model, got {type(purifier).__name__}")
    if not _contains_autoencoder(purifier):
        raise ValueError(
            f"model {purifier.name!r} contains no autoencoder from build_autoencoder "
            "(a model with 'pad', 'encoder', 'decoder' and 'crop' layers)"
        )
    if check:
        probe = _check_input(purifier)
        real = purifier(probe, training=False)
        error = float(tf.reduce_max(tf.abs(_walk(purifier, probe, 0.0) - real)))
        if not error <= 1e-5 * (1.0 + float(tf.reduce_max(tf.abs(real)))):
            raise ValueError(
                f"walking the layers of {purifier.name!r} does not reproduce it (max abs "
                f"difference {error:.3g}); it must be a chain of layers around the autoencoder"
            )

    def surrogate(x):
        return _walk(purifier, x, temperature)

    return surrogate


@tf.custom_gradient
def _forward_backward(forward, backward):
    """Returns `forward` and sends the whole upstream gradient to `backward`."""

    def grad(upstream):
        return tf.zeros_like(forward), upstream

    return tf.identity(forward), grad


def soft_routing_model_fn(purifier, classifier, temperature=DEFAULT_TEMPERATURE):
    """A model_fn: the real defended model forward, the soft-routing surrogate backward.

    The forward pass is exactly `classifier(purifier(x))`. Backward, the
    classifier's gradient at the real purified image flows through the
    surrogate's Jacobian at `x` (BPDA, Athalye et al. 2018, with the smooth
    surrogate as the approximation instead of `runner.bpda_model_fn`'s identity).

    Args:
      purifier: as in `soft_routing_purifier`.
      classifier: callable mapping images in [0, 1] to logits.
      temperature: the surrogate's temperature (> 0 for a smooth backward pass).

    Returns:
      A callable `x -> logits` for the attacks (works under `tf.function` and
      `tf.while_loop`). Build it once and reuse it: attack caches are keyed on
      this object.

    Raises:
      ValueError: as in `soft_routing_purifier`.
    """
    surrogate = soft_routing_purifier(purifier, temperature)

    def model_fn(x):
        x = tf.convert_to_tensor(x)
        # No gradient through the real purifier: its backward pass is the surrogate's.
        purified = tf.stop_gradient(tf.cast(purifier(x), x.dtype))
        smooth = tf.cast(surrogate(x), x.dtype)
        return classifier(_forward_backward(purified, smooth))

    return model_fn
