"""Tests for the autoencoder's custom layers: pooling with indices, unpooling, pad/crop."""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.models import layers as s2s_layers


def _relu_input_with_ties(shape, seed=0):
    """Random input where many 2x2 windows are all zero (as after a ReLU) or hold repeats."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.normal(size=shape), 0.0)
    x = np.round(x, 1)  # repeated values inside windows
    return tf.constant(x, tf.float32)


def _native_pool(x):
    return tf.nn.max_pool_with_argmax(x, 2, 2, "VALID", include_batch_in_index=True)


class MaxPoolWithArgmaxTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(((1, 4, 4, 1),), ((3, 8, 6, 5),), ((2, 16, 32, 7),))
    def test_stock_equals_native_including_ties(self, shape):
        x = _relu_input_with_ties(shape)
        values, indices = _native_pool(x)
        stock_values, stock_indices = s2s_layers.max_pool_2x2_with_argmax_stock(x)
        self.assertAllEqual(values, stock_values)
        self.assertAllEqual(indices, stock_indices)

    def test_all_zero_window_picks_first_element(self):
        x = tf.zeros([1, 2, 2, 1])
        for impl in s2s_layers.POOL_IMPLS:
            _, idx = s2s_layers.MaxPoolWithArgmax(impl)(x)
            self.assertEqual(int(idx[0, 0, 0, 0]), 0, msg=impl)

    def test_stock_gradient_goes_to_selected_element_like_native(self):
        x = _relu_input_with_ties((2, 6, 4, 3), seed=1)
        grads = []
        for impl in s2s_layers.POOL_IMPLS:
            with tf.GradientTape() as tape:
                tape.watch(x)
                pooled, _ = s2s_layers.MaxPoolWithArgmax(impl)(x)
                weights = tf.reshape(tf.range(1.0, 1.0 + 36.0), pooled.shape)
                loss = tf.reduce_sum(pooled * weights)
            grads.append(tape.gradient(loss, x))
        self.assertAllClose(grads[0], grads[1])
        # Exactly one element per window receives gradient.
        self.assertEqual(int(tf.math.count_nonzero(grads[1])), 2 * 3 * 2 * 3)

    def test_stock_compiles_under_xla_and_matches_native(self):
        x = _relu_input_with_ties((2, 8, 8, 4), seed=2)
        layer = s2s_layers.MaxPoolWithArgmax("stock")
        values, indices = tf.function(layer, jit_compile=True)(x)
        native_values, native_indices = _native_pool(x)
        self.assertAllEqual(values, native_values)
        self.assertAllEqual(indices, native_indices)

    def test_dynamic_shapes(self):
        fn = tf.function(
            s2s_layers.max_pool_2x2_with_argmax_stock,
            input_signature=[tf.TensorSpec([None, None, None, 3])],
        )
        for shape in ((1, 4, 6, 3), (2, 10, 2, 3)):
            x = _relu_input_with_ties(shape)
            self.assertAllEqual(fn(x)[1], _native_pool(x)[1])

    def test_bad_impl_raises(self):
        with self.assertRaisesRegex(ValueError, "pool impl"):
            s2s_layers.MaxPoolWithArgmax("cudnn")


class MaxUnpoolTest(tf.test.TestCase):
    def test_values_return_to_argmax_positions_and_zeros_elsewhere(self):
        x = _relu_input_with_ties((2, 6, 8, 3), seed=3) + 0.01  # no zero maxima
        pooled, indices = _native_pool(x)
        out = s2s_layers.MaxUnpool()([pooled, indices]).numpy()
        self.assertEqual(out.shape, (2, 6, 8, 3))
        flat = out.reshape(-1)
        self.assertAllClose(flat[indices.numpy().reshape(-1)], pooled.numpy().reshape(-1))
        self.assertEqual(np.count_nonzero(out), pooled.numpy().size)
        # Each 2x2 window keeps exactly its maximum.
        windows = out.reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4))
        self.assertAllClose(windows, pooled)

    def test_gradient_flows_through_unpool_to_pool_input(self):
        x = tf.random.normal((1, 4, 4, 2), seed=4)
        with tf.GradientTape() as tape:
            tape.watch(x)
            pooled, idx = s2s_layers.MaxPoolWithArgmax()(x)
            loss = tf.reduce_sum(s2s_layers.MaxUnpool()([pooled, idx]) ** 2)
        grad = tape.gradient(loss, x)
        self.assertIsNotNone(grad)
        self.assertAllClose(tf.reduce_sum(grad), tf.reduce_sum(2.0 * pooled))


class PadCropTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters((299, 32, 320), (28, 4, 28), (30, 8, 32), (1, 1, 1))
    def test_pad_reaches_multiple_and_crop_restores(self, size, multiple, expected):
        x = tf.random.uniform((2, size, size + 1, 3), seed=5)
        padded = s2s_layers.PadToMultiple(multiple)(x)
        self.assertEqual(padded.shape[1], expected)
        self.assertEqual(padded.shape[2] % multiple, 0)
        self.assertAllEqual(s2s_layers.CropLike()([padded, x]), x)

    def test_reflect_padding_mirrors_the_border(self):
        x = tf.reshape(tf.range(6.0), (1, 1, 6, 1))
        x = tf.tile(x, [1, 3, 1, 1])  # height 3 -> 4
        padded = s2s_layers.PadToMultiple(4)(x)
        self.assertAllEqual(padded[0, 3, :6, 0], x[0, 1, :, 0])

    def test_bad_arguments_raise(self):
        with self.assertRaisesRegex(ValueError, "multiple"):
            s2s_layers.PadToMultiple(0)
        with self.assertRaisesRegex(ValueError, "pad mode"):
            s2s_layers.PadToMultiple(4, mode="wrap")


class SerializationTest(tf.test.TestCase):
    def test_model_of_all_layers_round_trips_in_safe_mode(self):
        inputs = keras.Input((6, 6, 2))
        x = s2s_layers.PadToMultiple(4, name="pad")(inputs)
        pooled, idx = s2s_layers.MaxPoolWithArgmax("stock", name="pool")(x)
        pooled, idx = s2s_layers.StopGradient()([pooled, idx])
        x = s2s_layers.MaxUnpool()([pooled, idx])
        outputs = s2s_layers.CropLike()([x, inputs])
        model = keras.Model(inputs, outputs)
        data = tf.random.uniform((3, 6, 6, 2), seed=6)
        path = os.path.join(tempfile.mkdtemp(), "layers.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        self.assertAllEqual(loaded(data), model(data))
        self.assertEqual(loaded.get_layer("pool").impl, "stock")
        self.assertEqual(loaded.get_layer("pad").multiple, 4)


if __name__ == "__main__":
    tf.test.main()
