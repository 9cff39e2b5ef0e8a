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

A temperature in activation units means something else in every layer and
every model (a 28 px toy and an ImageNet SegNet differ by orders of
magnitude), so the evaluation sets it relative to each pool's measured scale:
`calibrate` measures, per pool, the median gap between the largest and the
second-largest activation of the windows that are not all zero, and
`soft_routing_model_fn(..., temperature, scales=...)` uses temperature *
scale in each layer. At a relative temperature of 1 the median window's
winner gets about e/(e+3) ~ 0.48 of the weight (soft); at 0.1 nearly all
(close to the hard switches).
"""

import math

import keras
import numpy as np
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
      temperature: softmax temperature > 0, in activation units (a float, or a
        scalar tensor or variable, which is not checked here).

    Returns:
      [N, 2h, 2w, C]: each value times its window's weights (which sum to 1).

    Raises:
      ValueError: unless temperature > 0 (for T = 0 use the hard `MaxUnpool`).
    """
    symbolic = tf.is_tensor(temperature) or isinstance(temperature, tf.Variable)
    if not symbolic and _check_temperature(temperature) == 0.0:
        raise ValueError("soft_unpool needs temperature > 0; T = 0 is the hard MaxUnpool")
    shape = tf.shape(pre_pool)
    n, h, w, c = shape[0], shape[1] // 2, shape[2] // 2, shape[3]
    # At least float32: exp(logits / T) in float16 would lose the small weights.
    dtype = tf.float64 if pre_pool.dtype == tf.float64 else tf.float32
    temperature = tf.cast(temperature, dtype)
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
    """Runs the decoder layer by layer, unpooling softly (or hard when temperature is 0).

    `temperature` is one value for every pool, or a dict pool name -> value.
    """
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
            t = temperature[pool_name] if isinstance(temperature, dict) else temperature
            t = t() if callable(t) else t
            x = (
                layer([x, indices])  # hard routing: the real autoencoder
                if isinstance(t, float) and t == 0.0
                else soft_unpool(x, pre_pool, t)
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


def _walk(model, x, on_autoencoder):
    """Calls `model`'s layers in order; the (nested) autoencoder is `on_autoencoder(ae, x)`."""
    if _is_autoencoder(model):
        return on_autoencoder(model, x)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            x = _walk(layer, x, on_autoencoder)
        else:
            x = layer(x, training=False)
    return x


def _soft(temperature):
    """The `_walk` hook that replaces the autoencoder by its soft-routing surrogate."""
    return lambda autoencoder, x: _surrogate_autoencoder(autoencoder, x, temperature)


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


def _layer_temperatures(temperature, scales):
    """One temperature for every pool, or temperature * scale per pool when `scales` is given."""
    temperature = _check_temperature(temperature)
    if scales is None:
        return temperature
    if not isinstance(scales, dict) or not scales:
        raise ValueError(f"scales must be a non-empty dict pool name -> scale, got {scales!r}")
    out = {}
    for name, scale in scales.items():
        if isinstance(scale, (tf.Variable, tf.Tensor)):
            # Read at call time, so re-measured scales need no retracing.
            out[name] = lambda scale=scale: temperature * tf.cast(scale, tf.float32)
        else:
            if not float(scale) > 0 or not math.isfinite(float(scale)):
                raise ValueError(f"the scale of pool {name!r} must be finite and > 0, got {scale}")
            out[name] = temperature * float(scale)
    return out


def soft_routing_purifier(purifier, temperature=DEFAULT_TEMPERATURE, *, scales=None, check=True):
    """Returns `surrogate(x)`: `purifier` recomputed with soft unpooling in its autoencoder.

    The walk calls the purifier's layers in order (it must be a chain, as
    `s2s_model.build_purifier` makes it, or an autoencoder itself) and the
    autoencoder's pad, encoder, decoder and crop layer by layer with the same
    weights, BatchNorm in inference mode; only the unpooling changes.

    Args:
      purifier: a model from `s2s_model.build_purifier` ([0, 1] -> [0, 1]) or
        from `autoencoder.build_autoencoder` (normalised space).
      temperature: softmax temperature; 0 is the hard routing (the real
        autoencoder), larger is smoother. In activation units, or relative to
        each pool's scale when `scales` is given.
      scales: None, or a dict pool name -> scale (from `calibrate`; floats or
        scalar `tf.Variable`s, which can be re-measured without retracing):
        pool p then unpools at temperature * scales[p].
      check: verify once that the walk with hard routing reproduces
        `purifier` (one forward pass on a 1-image batch), so a model of another
        shape fails here rather than yielding a wrong surrogate.

    Returns:
      A callable `x -> surrogate purified images`, usable inside `tf.function`.

    Raises:
      ValueError: for a bad temperature or scales, a purifier without a nested
        autoencoder, or one the walk does not reproduce.
    """
    temperature = _layer_temperatures(temperature, scales)
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
        error = float(tf.reduce_max(tf.abs(_walk(purifier, probe, _soft(0.0)) - real)))
        if not error <= 1e-5 * (1.0 + float(tf.reduce_max(tf.abs(real)))):
            raise ValueError(
                f"walking the layers of {purifier.name!r} does not reproduce it (max abs "
                f"difference {error:.3g}); it must be a chain of layers around the autoencoder"
            )
    if isinstance(temperature, dict):
        pools = _pool_maps(purifier, _check_input(purifier))
        if set(temperature) != set(pools):
            raise ValueError(
                f"scales name the pools {sorted(temperature)}, the autoencoder has {sorted(pools)}"
            )

    def surrogate(x):
        return _walk(purifier, x, _soft(temperature))

    return surrogate


def _pool_maps(purifier, x):
    """{pool name: the pre-pool feature map} of `purifier`'s autoencoder on images `x`."""
    pools = {}

    def record(autoencoder, x):
        _, found = _run_encoder(ae_lib.get_encoder(autoencoder), autoencoder.get_layer("pad")(x))
        pools.update({name: pre_pool for name, (pre_pool, _) in found.items()})
        return autoencoder(x, training=False)

    _walk(purifier, x, record)
    return pools


def window_gaps(pre_pool):
    """Per 2x2 window that is not all zero: its largest minus its second-largest value.

    Args:
      pre_pool: [N, 2h, 2w, C] feature map entering a pool.

    Returns:
      float numpy array [k] of the gaps (k windows with a nonzero maximum).
    """
    values = np.asarray(pre_pool, np.float64)
    n, h2, w2, c = values.shape
    windows = values.reshape(n, h2 // 2, 2, w2 // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    windows = np.sort(windows.reshape(-1, 4), axis=-1)
    active = np.abs(windows).max(axis=-1) > 0
    return (windows[:, -1] - windows[:, -2])[active]


def calibrate(purifier, images, batch_size=64):
    """Each pool's activation scale: the median window gap on `images` (see `window_gaps`).

    A relative temperature of 1 is then the typical margin by which a window's
    winner beats its runner-up, in every layer and whatever the model's units.

    Args:
      purifier: as in `soft_routing_purifier`.
      images: float32 [N, H, W, C] in the purifier's input space (a few batches suffice).
      batch_size: images per forward pass.

    Returns:
      A dict pool name -> float scale > 0, for `soft_routing_purifier(scales=...)`.

    Raises:
      ValueError: for no images, or a pool whose windows are all zero (no scale).
    """
    images = np.asarray(images, np.float32)
    if not len(images):
        raise ValueError("calibrate needs at least one image")
    gaps = {}
    for start in range(0, len(images), batch_size):
        maps = _pool_maps(purifier, tf.constant(images[start : start + batch_size]))
        for name, pre_pool in maps.items():
            gaps.setdefault(name, []).append(window_gaps(pre_pool))
    scales = {}
    for name, parts in gaps.items():
        gap = np.concatenate(parts)
        gap = gap[gap > 0]  # exact ties (e.g. saturated units) carry no scale
        if not len(gap):
            raise ValueError(f"pool {name!r} has no window with distinct values on these images")
        scales[name] = float(np.median(gap))
    return scales


@tf.custom_gradient
def _forward_backward(forward, backward):
    """Returns `forward` and sends the whole upstream gradient to `backward`."""

    def grad(upstream):
        return tf.zeros_like(forward), upstream

    return tf.identity(forward), grad


def soft_routing_model_fn(purifier, classifier, temperature=DEFAULT_TEMPERATURE, scales=None):
    """A model_fn: the real defended model forward, the soft-routing surrogate backward.

    The forward pass is exactly `classifier(purifier(x))`. Backward, the
    classifier's gradient at the real purified image flows through the
    surrogate's Jacobian at `x` (BPDA, Athalye et al. 2018, with the smooth
    surrogate as the approximation instead of `runner.bpda_model_fn`'s identity).

    Args:
      purifier: as in `soft_routing_purifier`.
      classifier: callable mapping images in [0, 1] to logits.
      temperature: the surrogate's temperature (> 0 for a smooth backward pass).
      scales: as in `soft_routing_purifier` (then `temperature` is relative).

    Returns:
      A callable `x -> logits` for the attacks (works under `tf.function` and
      `tf.while_loop`). Build it once and reuse it: attack caches are keyed on
      this object.

    Raises:
      ValueError: as in `soft_routing_purifier`.
    """
    surrogate = soft_routing_purifier(purifier, temperature, scales=scales)

    def model_fn(x):
        x = tf.convert_to_tensor(x)
        # No gradient through the real purifier: its backward pass is the surrogate's.
        purified = tf.stop_gradient(tf.cast(purifier(x), x.dtype))
        smooth = tf.cast(surrogate(x), x.dtype)
        return classifier(_forward_backward(purified, smooth))

    return model_fn
