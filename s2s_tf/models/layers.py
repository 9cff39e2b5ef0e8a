"""Custom Keras layers of the SegNet autoencoder: pooling with indices, unpooling, pad/crop.

Every layer here is a registered serializable Keras layer (no `Lambda`), so a
model that uses them saves to `.keras` and loads with `safe_mode=True`. They
are written with TensorFlow ops because the project runs on the TensorFlow
backend, and the pooling indices must follow `tf.nn.max_pool_with_argmax`'s
flat-index convention.
"""

import keras
import tensorflow as tf

POOL_IMPLS = ("native", "stock")


def _static_or_dynamic_shape(x):
    """Returns the shape of `x` as a list of Python ints where known, scalar tensors otherwise."""
    static = x.shape.as_list()
    dynamic = tf.shape(x)
    return [dynamic[i] if dim is None else dim for i, dim in enumerate(static)]


def max_pool_2x2_with_argmax_stock(x):
    """2x2/stride-2 max pooling with argmax indices, built from stock (XLA-compilable) ops.

    `tf.nn.max_pool_with_argmax` has no XLA kernel, so `jit_compile=True` needs
    this path. It returns the same values and the same flat indices as
    `tf.nn.max_pool_with_argmax(x, 2, 2, "VALID", include_batch_in_index=True)`,
    including its tie-breaking (the first maximum in row-major window order,
    which is also PyTorch's), and sends the gradient only to the selected
    element, as the native kernel does. `tf.reduce_max` would split the gradient
    between tied elements, which is common after a ReLU (all-zero windows).

    Args:
      x: float tensor [N, H, W, C] with even H and W.

    Returns:
      (pooled [N, H/2, W/2, C], argmax int64 [N, H/2, W/2, C]).
    """
    n, h, w, c = _static_or_dynamic_shape(x)
    windows = tf.reshape(x, [n, h // 2, 2, w // 2, 2, c])
    windows = tf.transpose(windows, [0, 1, 3, 5, 2, 4])  # [N, H/2, W/2, C, 2, 2]
    windows = tf.reshape(windows, [n, h // 2, w // 2, c, 4])
    position = tf.argmax(windows, axis=-1, output_type=tf.int64)  # first max wins ties
    pooled = tf.reduce_sum(windows * tf.one_hot(position, 4, dtype=x.dtype), axis=-1)

    def grid(size, axis):
        shape = [1, 1, 1, 1]
        shape[axis] = size
        return tf.reshape(tf.range(tf.cast(size, tf.int64), dtype=tf.int64), shape)

    h64, w64, c64 = (tf.cast(d, tf.int64) for d in (h, w, c))
    row = 2 * grid(h // 2, 1) + position // 2
    col = 2 * grid(w // 2, 2) + position % 2
    flat = ((grid(n, 0) * h64 + row) * w64 + col) * c64 + grid(c, 3)
    return pooled, flat


@keras.saving.register_keras_serializable(package="s2s_tf")
class MaxPoolWithArgmax(keras.layers.Layer):
    """2x2/stride-2 max pooling that also returns the argmax indices (SegNet encoder).

    Indices are flat over the whole batch tensor (`include_batch_in_index=True`),
    the form `MaxUnpool` consumes.

    Args:
      impl: "native" uses `tf.nn.max_pool_with_argmax` (fastest, no XLA kernel);
        "stock" uses stock ops that XLA compiles and that give equal results.
    """

    def __init__(self, impl="native", **kwargs):
        super().__init__(**kwargs)
        if impl not in POOL_IMPLS:
            raise ValueError(f"pool impl must be one of {POOL_IMPLS}, got {impl!r}")
        self.impl = impl

    def call(self, x):
        if self.impl == "stock":
            return max_pool_2x2_with_argmax_stock(x)
        # Grappler's arithmetic optimizer rewrites max_pool(relu(x)) as relu(max_pool(x))
        # and mis-wires MaxPoolWithArgmax's second output when it does, which makes it
        # drop every optimisation of the whole function. EnsureShape (an identity with a
        # gradient) between the two hides the pattern.
        pooled, argmax = tf.nn.max_pool_with_argmax(
            tf.ensure_shape(x, x.shape),
            ksize=2,
            strides=2,
            padding="VALID",
            include_batch_in_index=True,
        )
        return pooled, argmax

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        out = (n, None if h is None else h // 2, None if w is None else w // 2, c)
        return out, out

    def compute_output_spec(self, x):
        shape = self.compute_output_shape(x.shape)[0]
        return (
            keras.KerasTensor(shape, dtype=x.dtype),
            keras.KerasTensor(shape, dtype="int64"),
        )

    def get_config(self):
        return {**super().get_config(), "impl": self.impl}


@keras.saving.register_keras_serializable(package="s2s_tf")
class MaxUnpool(keras.layers.Layer):
    """Inverse of `MaxPoolWithArgmax`: scatters each value back to its argmax position.

    Every other position of the 2x-larger output is zero, as in SegNet and
    `torch.nn.functional.max_unpool2d`. `tf.scatter_nd` has a gradient with
    respect to the values (a gather), so gradients reach the encoder input.
    """

    def call(self, inputs):
        values, indices = inputs
        n, h, w, c = _static_or_dynamic_shape(values)
        out_shape = [n, 2 * h, 2 * w, c]
        size = tf.cast(n * 2 * h * 2 * w * c, tf.int64)
        flat = tf.scatter_nd(
            tf.reshape(indices, [-1, 1]), tf.reshape(values, [-1]), tf.reshape(size, [1])
        )
        return tf.reshape(flat, out_shape)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape[0]
        return (n, None if h is None else 2 * h, None if w is None else 2 * w, c)


@keras.saving.register_keras_serializable(package="s2s_tf")
class PadToMultiple(keras.layers.Layer):
    """Pads height and width at the bottom/right up to a multiple of `multiple`.

    Five poolings need sizes divisible by 32; InceptionV3's 299 px becomes 320.
    Reflection padding (the default) avoids the hard edge that zero padding
    would put into the reconstruction; `CropLike` removes the padding again.

    Args:
      multiple: the size divisor, 2**num_stages for the autoencoder.
      mode: "reflect", "symmetric" or "constant" (as `tf.pad`).
    """

    def __init__(self, multiple, mode="reflect", **kwargs):
        super().__init__(**kwargs)
        if int(multiple) < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        if mode.lower() not in ("reflect", "symmetric", "constant"):
            raise ValueError(f"pad mode must be reflect, symmetric or constant, got {mode!r}")
        self.multiple = int(multiple)
        self.mode = mode.lower()

    def _pad_amount(self, size):
        return (-size) % self.multiple

    def call(self, x):
        _, h, w, _ = _static_or_dynamic_shape(x)
        paddings = [[0, 0], [0, self._pad_amount(h)], [0, self._pad_amount(w)], [0, 0]]
        return tf.pad(x, paddings, mode=self.mode.upper())

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        grow = lambda s: None if s is None else s + self._pad_amount(s)  # noqa: E731
        return (n, grow(h), grow(w), c)

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple, "mode": self.mode}


@keras.saving.register_keras_serializable(package="s2s_tf")
class CropLike(keras.layers.Layer):
    """Crops `inputs[0]` at the top-left to the height and width of `inputs[1]`."""

    def call(self, inputs):
        x, reference = inputs
        _, h, w, _ = _static_or_dynamic_shape(reference)
        return x[:, :h, :w, :]

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])


@keras.saving.register_keras_serializable(package="s2s_tf")
class StopGradient(keras.layers.Layer):
    """Identity in the forward pass, no gradient in the backward pass.

    Used to cut the autoencoder's bottleneck and pooling indices from the graph
    when only the decoder trains (stage 2), so no encoder gradient is computed.
    """

    def call(self, x):
        return tf.nest.map_structure(tf.stop_gradient, x)

    def compute_output_spec(self, x):
        return tf.nest.map_structure(lambda t: keras.KerasTensor(t.shape, dtype=t.dtype), x)
