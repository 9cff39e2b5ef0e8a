"""Tests for the SegNet S2SNet autoencoder builder."""

import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import layers as s2s_layers

TINY = ae_lib.AutoencoderConfig(stage_widths=((8, 8), (16,)))


@contextlib.contextmanager
def _float64():
    """Builds Keras layers (and their inputs) in float64, restoring the global policy after."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")  # keras.Input takes floatx, not the dtype policy
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def _central_differences(fn, x, step):
    """d fn / d x by central differences; `fn` maps a batch [B, ...] to [B] values.

    All 2 * x.size perturbed copies of `x` (one example) go through `fn` in one batch.
    """
    eye = np.eye(x.size, dtype=x.dtype).reshape(x.size, *x.shape[1:]) * step
    values = fn(np.concatenate([x + eye, x - eye]))
    return ((values[: x.size] - values[x.size :]) / (2 * step)).reshape(x.shape)


def _count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


class FullSizeTest(tf.test.TestCase):
    """The paper's model, built once (29.5 M parameters, no forward pass)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = ae_lib.build_autoencoder()

    def test_parameter_count_is_exact(self):
        self.assertEqual(self.model.count_params(), 29_496_259)
        self.assertEqual(_count(self.model.trainable_weights), 29_480_259)
        self.assertEqual(_count(self.model.non_trainable_weights), 16_000)

    def test_layer_names_and_widths_follow_the_authors(self):
        encoder = ae_lib.get_encoder(self.model)
        decoder = ae_lib.get_decoder(self.model)
        enc = {
            layer.name: layer.filters
            for layer in encoder.layers
            if isinstance(layer, keras.layers.Conv2D)
        }
        dec = [
            (layer.name, layer.filters)
            for layer in decoder.layers
            if isinstance(layer, keras.layers.Conv2D)
        ]
        self.assertEqual(
            list(enc.values()), [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
        )
        self.assertEqual(list(enc)[0], "conv11")
        self.assertEqual(list(enc)[-1], "conv53")
        self.assertEqual(
            dec,
            [
                ("conv53d", 512), ("conv52d", 512), ("conv51d", 512),
                ("conv43d", 512), ("conv42d", 512), ("conv41d", 256),
                ("conv33d", 256), ("conv32d", 256), ("conv31d", 128),
                ("conv22d", 128), ("conv21d", 64),
                ("conv12d", 64), ("conv11d", 64),
                ("conv_final", 3),
            ],
        )  # fmt: skip
        self.assertEqual(decoder.get_layer("conv_final").kernel.shape, (1, 1, 64, 3))
        self.assertEqual(decoder.get_layer("conv_final").activation.__name__, "linear")

    def test_five_pools_with_indices_and_five_unpools(self):
        encoder = ae_lib.get_encoder(self.model)
        self.assertLen(encoder.outputs, 6)
        for idx in encoder.outputs[1:]:
            self.assertEqual(idx.dtype, "int64")
        decoder = ae_lib.get_decoder(self.model)
        names = [layer.name for layer in decoder.layers]
        self.assertEqual(
            [n for n in names if n.startswith("unpool")], [f"unpool{s}" for s in "54321"]
        )
        self.assertFalse(any("transpose" in n or "up_sampling" in n for n in names))

    def test_batchnorm_matches_pytorch_defaults(self):
        bns = [
            layer
            for layer in self.model._flatten_layers()
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        self.assertLen(bns, 26)
        for bn in bns:
            self.assertAllClose([bn.momentum, bn.epsilon], [0.9, 1e-5])


class AutoencoderTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters((28, 2), (30, 2), (32, 3), (64, 3), (299, 5))
    def test_output_has_input_shape(self, size, stages):
        config = ae_lib.AutoencoderConfig(stage_widths=((4,),) * stages)
        model = ae_lib.build_autoencoder(config, input_shape=(size, size, 3))
        x = tf.random.normal((2, size, size, 3), seed=0)
        self.assertEqual(model(x).shape, (2, size, size, 3))

    def test_dynamic_size_model_accepts_several_sizes(self):
        model = ae_lib.build_autoencoder(TINY)
        for size in ((12, 16), (30, 18)):
            self.assertEqual(model(tf.zeros((1, *size, 3))).shape, (1, *size, 3))

    def test_channels_configurable(self):
        config = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)), channels=1)
        model = ae_lib.build_autoencoder(config, input_shape=(8, 8, 1))
        self.assertEqual(model(tf.zeros((1, 8, 8, 1))).shape, (1, 8, 8, 1))

    @parameterized.named_parameters(
        ("no_stages", dict(stage_widths=()), "stage_widths"),
        ("empty_stage", dict(stage_widths=((8,), ())), r"stage_widths\[1\]"),
        ("negative_width", dict(stage_widths=((8, -1),)), r"stage_widths\[0\]"),
        ("too_many_stages", dict(stage_widths=((8,),), num_stages=2), "num_stages"),
        ("zero_channels", dict(channels=0), "channels"),
        ("momentum", dict(bn_momentum=1.5), "bn_momentum"),
        ("pool_impl", dict(pool_impl="cuda"), "pool_impl"),
        ("pad_mode", dict(pad_mode="wrap"), "pad_mode"),
    )
    def test_bad_config_raises(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(**kwargs))

    def test_bad_input_shape_raises(self):
        with self.assertRaisesRegex(ValueError, "input_shape"):
            ae_lib.build_autoencoder(TINY, input_shape=(8, 8, 1))
        with self.assertRaisesRegex(ValueError, "too small"):
            ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(), input_shape=(10, 10, 3))

    def test_num_stages_truncates(self):
        config = ae_lib.AutoencoderConfig(num_stages=2)
        model = ae_lib.build_autoencoder(config)
        self.assertLen(ae_lib.get_encoder(model).outputs, 3)
        self.assertEqual(len(ae_lib.encoder_conv_layers(model)), 4)

    def test_keras_round_trip_in_safe_mode(self):
        model = ae_lib.build_autoencoder(TINY, input_shape=(12, 12, 3))
        x = tf.random.normal((3, 12, 12, 3), seed=1)
        model(x, training=True)  # move BN statistics away from their initial values
        path = os.path.join(tempfile.mkdtemp(), "ae.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
        self.assertAllEqual(loaded(x, training=False), model(x, training=False))
        self.assertEqual(loaded.count_params(), model.count_params())

    @parameterized.parameters(*s2s_layers.POOL_IMPLS)
    def test_input_gradient_matches_finite_differences(self, pool_impl):
        # A function of model(x) alone: an MSE to x itself has a direct -x term, which
        # would pass with no gradient through the autoencoder at all. Float64, so a
        # 1e-6 step is far from every pooling argmax flip and from round-off.
        config = dataclasses.replace(TINY, pool_impl=pool_impl)
        with _float64():
            keras.utils.set_random_seed(5)
            # 10 px: padded to 12 by reflection, so the pad and crop gradients count too.
            model = ae_lib.build_autoencoder(config, input_shape=(10, 10, 3))
        self.assertEqual({w.dtype for w in model.weights}, {"float64"})
        rng = np.random.default_rng(2)
        x = rng.normal(size=(1, 10, 10, 3))
        weights = tf.constant(rng.normal(size=x.shape))

        def objective(images):
            return tf.reduce_sum(weights * model(images, training=False), axis=[1, 2, 3])

        x_t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x_t)
            value = objective(x_t)
        self.assertEqual(value.dtype, tf.float64)
        grad = tape.gradient(value, x_t)
        self.assertIsNotNone(grad, "no gradient reaches the input")
        numeric = _central_differences(lambda b: objective(tf.constant(b)).numpy(), x, 1e-6)
        self.assertGreater(np.abs(numeric).max(), 1e-3)  # the check is not 0 == 0
        self.assertAllClose(grad, numeric, rtol=1e-6, atol=1e-8)

    def test_decoder_only_forward_cuts_encoder_gradients(self):
        model = ae_lib.build_autoencoder(TINY, input_shape=(12, 12, 3))
        x = tf.random.normal((2, 12, 12, 3), seed=3)
        encoder_vars = ae_lib.get_encoder(model).trainable_variables
        decoder_vars = ae_lib.get_decoder(model).trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = ae_lib.decoder_only_forward(model, x, training=True)
            loss = tf.reduce_mean(tf.square(y - x))
        self.assertTrue(all(g is None for g in tape.gradient(loss, encoder_vars)))
        self.assertIsNone(tape.gradient(y, x))
        self.assertTrue(all(g is not None for g in tape.gradient(loss, decoder_vars)))
        self.assertAllClose(
            ae_lib.decoder_only_forward(model, x), model(x, training=False), atol=1e-6
        )

    def test_xla_stock_pooling_matches_native_model(self):
        native = ae_lib.build_autoencoder(TINY, input_shape=(12, 12, 3))
        stock_cfg = ae_lib.AutoencoderConfig(stage_widths=TINY.stage_widths, pool_impl="stock")
        stock = ae_lib.build_autoencoder(stock_cfg, input_shape=(12, 12, 3))
        stock.set_weights(native.get_weights())
        x = tf.random.normal((2, 12, 12, 3), seed=4)
        compiled = tf.function(lambda t: stock(t, training=False), jit_compile=True)
        self.assertAllClose(compiled(x), native(x, training=False), atol=1e-5)

    def test_graph_optimizer_accepts_the_native_pooling_graph(self):
        # Grappler once mis-wired relu -> MaxPoolWithArgmax and then skipped every
        # optimisation of the function, logging this message; run in a fresh process
        # so the C++ log is captured.
        script = textwrap.dedent(
            """
            import tensorflow as tf
            from s2s_tf.models import autoencoder as ae_lib
            config = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)))
            model = ae_lib.build_autoencoder(config, input_shape=(8, 8, 3))
            print(tf.function(lambda x: model(x, training=False))(tf.ones((2, 8, 8, 3))).shape)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            cwd=tempfile.gettempdir(),
        )
        self.assertIn("(2, 8, 8, 3)", result.stdout)
        self.assertNotIn("function optimization failure", result.stderr)

    def test_sync_batchnorm_flag(self):
        config = ae_lib.AutoencoderConfig(stage_widths=((4,),), sync_batchnorm=True)
        model = ae_lib.build_autoencoder(config)
        self.assertTrue(ae_lib.get_encoder(model).get_layer("bn11").synchronized)


if __name__ == "__main__":
    tf.test.main()
