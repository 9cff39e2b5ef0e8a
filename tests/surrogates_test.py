"""Tests for s2s_tf.robustness.surrogates: the soft-routing surrogate of the autoencoder."""

import keras
import numpy as np
import tensorflow as tf

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import layers
from s2s_tf.models import s2s_model
from s2s_tf.robustness import runner
from s2s_tf.robustness import surrogates
from s2s_tf.robustness.attacks import pgd

SHAPE = (16, 16, 3)
NUM_CLASSES = 3
TINY = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)), num_stages=2)


def _randomize_batchnorm(autoencoder, rng):
    """Moves BatchNorm statistics off their identity init, so inference mode is observable."""
    for layer in ae_lib.get_encoder(autoencoder).layers + ae_lib.get_decoder(autoencoder).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0.0, 0.1, size).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size).astype(np.float32))


def _max_abs(a, b):
    return float(tf.reduce_max(tf.abs(a - b)))


def _grad(model_fn, x, y):
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(y, model_fn(x))
    return tape.gradient(loss, x)


def _relative(a, b):
    return float(tf.norm(a - b) / tf.norm(b))


class SoftUnpoolTest(tf.test.TestCase):
    def test_spreads_each_value_over_its_window(self):
        rng = np.random.default_rng(1)
        values = tf.constant(rng.normal(size=(2, 3, 4, 5)), tf.float32)
        pre_pool = tf.constant(rng.uniform(0.1, 1.0, (2, 6, 8, 5)), tf.float32)
        out = surrogates.soft_unpool(values, pre_pool, 0.3)
        self.assertEqual(out.shape, pre_pool.shape)
        window_sums = tf.reduce_sum(tf.reshape(out, (2, 3, 2, 4, 2, 5)), axis=[2, 4])
        self.assertAllClose(window_sums, values)
        # Cold, it is the hard unpooling with the max pool's switches.
        _, switches = tf.nn.max_pool_with_argmax(
            pre_pool, 2, 2, "VALID", include_batch_in_index=True
        )
        hard = layers.MaxUnpool()([values, switches])
        self.assertAllClose(surrogates.soft_unpool(values, pre_pool, 1e-4), hard, atol=1e-6)
        self.assertGreater(_max_abs(out, hard), 0.1)

    def test_all_zero_window_routes_to_its_first_position(self):
        pre_pool = tf.zeros((1, 2, 2, 1))  # four ReLU zeros: the hard pool picks (0, 0)
        out = surrogates.soft_unpool(tf.constant([[[[3.0]]]]), pre_pool, 0.1)
        self.assertAllEqual(tf.reshape(out, [-1]), [3.0, 0.0, 0.0, 0.0])
        with self.assertRaisesRegex(ValueError, "temperature > 0"):
            surrogates.soft_unpool(tf.constant([[[[3.0]]]]), pre_pool, 0.0)

    def test_gradient_reaches_the_switches(self):
        # The routing term (how the soft switches move) is the point of the surrogate:
        # the gradient with respect to the pre-pool map is nonzero and exact.
        rng = np.random.default_rng(2)
        values = tf.constant(rng.normal(size=(1, 2, 2, 3)))
        pre_pool = tf.constant(rng.uniform(0.1, 1.0, (1, 4, 4, 3)))
        theoretical, numerical = tf.test.compute_gradient(
            lambda p: surrogates.soft_unpool(values, p, 0.3), [pre_pool]
        )
        self.assertGreater(np.abs(theoretical[0]).max(), 0.1)
        self.assertAllClose(theoretical[0], numerical[0], atol=1e-6)


class SoftRoutingTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        cls.ae = ae_lib.build_autoencoder(TINY, input_shape=SHAPE)
        _randomize_batchnorm(cls.ae, rng)
        cls.purifier = s2s_model.build_purifier(cls.ae, SHAPE)
        cls.classifier = classifiers.build_classifier_with_preprocessing(
            "testing", SHAPE, num_classes=NUM_CLASSES
        )
        cls.defended = s2s_model.build_s2s_model(cls.ae, cls.classifier)
        cls.x = tf.constant(rng.uniform(0.0, 1.0, (4, *SHAPE)), tf.float32)
        cls.y = tf.constant([0, 1, 2, 0])

    def setUp(self):
        super().setUp()
        # An instance attribute: a function stored on the class would bind as a method.
        self.model_fn = surrogates.soft_routing_model_fn(self.purifier, self.classifier, 0.1)

    def test_hard_routing_reproduces_the_autoencoder_exactly(self):
        hard = surrogates.soft_routing_purifier(self.purifier, 0.0)
        self.assertAllEqual(hard(self.x), self.purifier(self.x))
        normalised = self.x * 2.0 - 1.0
        hard_ae = surrogates.soft_routing_purifier(self.ae, 0.0)
        self.assertAllEqual(hard_ae(normalised), self.ae(normalised))

    def test_converges_to_the_autoencoder_as_temperature_goes_to_zero(self):
        real = self.purifier(self.x)
        errors = [
            _max_abs(surrogates.soft_routing_purifier(self.purifier, t)(self.x), real)
            for t in (1.0, 0.1, 0.01, 1e-3, 1e-4)
        ]
        print("max |surrogate - autoencoder| at T = 1, 0.1, 0.01, 1e-3, 1e-4:", errors)
        self.assertGreater(errors[0], 1e-2)  # a soft surrogate really differs
        for hotter, colder in zip(errors, errors[1:], strict=False):
            self.assertLess(colder, hotter)
        self.assertLess(errors[2], errors[0] / 2)
        self.assertLess(errors[-1], 1e-4)

    def test_forward_is_the_defended_model(self):
        logits = self.model_fn(self.x)
        self.assertAllEqual(logits, self.defended(self.x))
        self.assertAllEqual(logits, self.classifier(self.purifier(self.x)))

    def test_gradient_is_the_surrogate_chain_rule(self):
        grad = _grad(self.model_fn, self.x, self.y)
        self.assertTrue(np.all(np.isfinite(grad)))
        self.assertGreater(float(tf.reduce_max(tf.abs(grad))), 0.0)
        # Expected: the classifier's gradient at the real purified image, pulled back
        # through the surrogate's Jacobian at x.
        classifier_grad = _grad(self.classifier, self.purifier(self.x), self.y)
        surrogate = surrogates.soft_routing_purifier(self.purifier, 0.1)
        with tf.GradientTape() as tape:
            tape.watch(self.x)
            smooth = surrogate(self.x)
        expected = tape.gradient(smooth, self.x, output_gradients=classifier_grad)
        self.assertAllClose(grad, expected, atol=1e-6)

    def test_gradient_differs_from_white_box_and_bpda(self):
        grad = _grad(self.model_fn, self.x, self.y)
        white_box = _grad(self.defended, self.x, self.y)
        bpda = _grad(runner.bpda_model_fn(self.purifier, self.classifier), self.x, self.y)
        to_white, to_bpda = _relative(grad, white_box), _relative(grad, bpda)
        print(f"relative gradient difference: to white-box {to_white:.3f}, to BPDA {to_bpda:.3f}")
        self.assertGreater(to_white, 0.05)
        self.assertGreater(to_bpda, 0.05)
        # Colder surrogates approach the white-box gradient (switches held fixed).
        cold = surrogates.soft_routing_model_fn(self.purifier, self.classifier, 1e-4)
        self.assertLess(_relative(_grad(cold, self.x, self.y), white_box), to_white)

    def _switch_flip(self):
        """Brackets, to 1e-6, a value of one pixel where a pooling switch flips.

        Returns (low, high) normalised images one pixel apart whose argmax
        indices differ and whose real reconstructions differ by more than 1e-3.
        """
        encoder, pad = ae_lib.get_encoder(self.ae), self.ae.get_layer("pad")

        def switches(images):
            # Flat indices count from the batch's start; each image's own start is removed.
            indices = [i % (4 * np.prod(i.shape[1:])) for i in encoder(pad(images))[1:]]
            return np.concatenate([np.reshape(i, (len(images), -1)) for i in indices], axis=1)

        base = tf.random.stateless_normal((1, *SHAPE), seed=(3, 4))
        mask = np.zeros((1, *SHAPE), np.float32)
        mask[0, 6, 5, 1] = 1.0
        images = lambda t: base * (1.0 - mask) + np.reshape(t, (-1, 1, 1, 1)) * mask  # noqa: E731
        grid = np.linspace(-3.0, 3.0, 61, dtype=np.float32)
        flips = np.flatnonzero(np.any(np.diff(switches(images(grid)), axis=0) != 0, axis=1))
        self.assertNotEmpty(flips, "no switch flips along this pixel; pick another pixel")
        for k in flips:
            lo, hi = grid[k], grid[k + 1]
            while hi - lo > 1e-6:
                mid = np.float32((lo + hi) / 2)
                same = np.array_equal(*switches(images(np.array([lo, mid]))))
                lo, hi = (mid, hi) if same else (lo, mid)
            pair = images(np.array([lo, hi], np.float32))
            reconstructions = self.ae(pair)
            if _max_abs(reconstructions[0], reconstructions[1]) > 1e-3:
                return pair[:1], pair[1:]
        self.fail("no switch flip changes the reconstruction by more than 1e-3")

    def test_surrogate_is_continuous_across_a_switch_flip(self):
        surrogate = surrogates.soft_routing_purifier(self.ae, 0.1)
        low, high = self._switch_flip()
        hard_jump = _max_abs(self.ae(low), self.ae(high))
        soft_change = _max_abs(surrogate(low), surrogate(high))
        step = _max_abs(low, high)
        print(
            f"pixel step {step:.2g}: autoencoder jumps {hard_jump:.3g}, surrogate {soft_change:.3g}"
        )
        self.assertLessEqual(step, 1e-6)
        self.assertGreater(hard_jump, 1e-3)
        self.assertLess(soft_change, hard_jump / 100)

    def test_pgd_runs_compiled(self):
        eps = 0.05
        attack = tf.function(lambda x, y: pgd.pgd(self.model_fn, x, y, eps, steps=3))
        adv = attack(self.x, self.y)
        self.assertAllInRange(adv, 0.0, 1.0)
        self.assertLessEqual(_max_abs(adv, self.x), eps + 1e-6)
        self.assertGreater(_max_abs(adv, self.x), 0.0)
        self.assertEqual(attack.experimental_get_tracing_count(), 1)

    def test_bad_arguments_raise(self):
        for temperature in (-0.1, float("nan"), float("inf"), "0.1", None):
            with self.assertRaisesRegex(ValueError, "temperature"):
                surrogates.soft_routing_purifier(self.purifier, temperature)
        with self.assertRaisesRegex(ValueError, "contains no autoencoder"):
            surrogates.soft_routing_purifier(self.classifier, 0.1)
        with self.assertRaisesRegex(ValueError, "keras.Model"):
            surrogates.soft_routing_purifier(lambda x: x, 0.1)
        # A layer used twice is not a chain the walk can follow: caught by the check.
        inputs = keras.Input(SHAPE)
        halve = keras.layers.Rescaling(0.5)
        twice = keras.Model(inputs, self.ae(halve(halve(inputs))))
        with self.assertRaisesRegex(ValueError, "does not reproduce"):
            surrogates.soft_routing_purifier(twice, 0.1)


class CalibrationTest(tf.test.TestCase):
    """Temperatures relative to each pool's measured scale."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(1)
        rng = np.random.default_rng(1)
        cls.ae = ae_lib.build_autoencoder(TINY, input_shape=SHAPE)
        _randomize_batchnorm(cls.ae, rng)
        cls.purifier = s2s_model.build_purifier(cls.ae, SHAPE)
        cls.classifier = classifiers.build_classifier_with_preprocessing(
            "testing", SHAPE, num_classes=NUM_CLASSES
        )
        cls.x = tf.constant(rng.uniform(0.0, 1.0, (8, *SHAPE)), tf.float32)
        cls.y = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])

    def test_window_gaps_by_hand(self):
        pre_pool = np.zeros((1, 2, 4, 1), np.float32)
        pre_pool[0, :, :2, 0] = [[1.0, 3.0], [2.0, 0.5]]  # gap 3 - 2 = 1
        # The second window is all zero: no gap.
        self.assertAllClose(surrogates.window_gaps(pre_pool), [1.0])

    def test_scales_are_per_pool_medians(self):
        scales = surrogates.calibrate(self.purifier, self.x, batch_size=3)
        self.assertEqual(sorted(scales), ["pool1", "pool2"])
        maps = surrogates._pool_maps(self.purifier, self.x)
        for name, scale in scales.items():
            gaps = surrogates.window_gaps(maps[name])
            self.assertAllClose(scale, np.median(gaps[gaps > 0]), rtol=1e-6)
        self.assertNotAllClose(scales["pool1"], scales["pool2"])

    def test_relative_temperature_is_temperature_times_scale(self):
        scales = {"pool1": 0.5, "pool2": 0.5}
        relative = surrogates.soft_routing_purifier(self.purifier, 0.2, scales=scales)
        absolute = surrogates.soft_routing_purifier(self.purifier, 0.1)
        self.assertAllClose(relative(self.x), absolute(self.x), atol=1e-6)
        # A variable scale is read at call time, without retracing.
        var = {"pool1": tf.Variable(0.5), "pool2": tf.Variable(0.5)}
        surrogate = tf.function(surrogates.soft_routing_purifier(self.purifier, 0.2, scales=var))
        before = surrogate(self.x)
        var["pool1"].assign(5.0)
        self.assertGreater(_max_abs(surrogate(self.x), before), 1e-4)
        self.assertEqual(surrogate.experimental_get_tracing_count(), 1)

    def test_bad_scales_raise(self):
        with self.assertRaisesRegex(ValueError, "pools"):
            surrogates.soft_routing_purifier(self.purifier, 1.0, scales={"pool1": 1.0})
        with self.assertRaisesRegex(ValueError, "scale of pool"):
            surrogates.soft_routing_purifier(
                self.purifier, 1.0, scales={"pool1": 0.0, "pool2": 1.0}
            )
        with self.assertRaisesRegex(ValueError, "at least one image"):
            surrogates.calibrate(self.purifier, np.zeros((0, *SHAPE), np.float32))

    def test_calibrated_surrogate_is_not_effectively_hard_on_a_trained_model(self):
        # Train the autoencoder briefly to reconstruct, so its activations have a
        # trained model's scale, then compare gradients at relative temperature 1.
        ae = ae_lib.build_autoencoder(TINY, input_shape=SHAPE)
        purifier = s2s_model.build_purifier(ae, SHAPE)
        optimizer = keras.optimizers.Adam(3e-3)
        rng = np.random.default_rng(3)
        smooth = np.cumsum(rng.uniform(0, 0.2, (64, *SHAPE)), axis=1) % 1.0
        data = tf.constant(smooth, tf.float32)
        for _ in range(40):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(purifier(data, training=True) - data))
            grads = tape.gradient(loss, ae.trainable_variables)
            optimizer.apply(grads, ae.trainable_variables)
        scales = surrogates.calibrate(purifier, data)
        defended = s2s_model.build_s2s_model(ae, self.classifier)
        white_box = _grad(defended, data[:8], self.y)
        differences = {}
        for t in (1.0, 1e-4):
            model_fn = surrogates.soft_routing_model_fn(purifier, self.classifier, t, scales)
            differences[t] = _relative(_grad(model_fn, data[:8], self.y), white_box)
        print("scales", scales, "relative gradient difference to white-box", differences)
        self.assertGreater(differences[1.0], 0.1)
        self.assertLess(differences[1e-4], differences[1.0] / 10)


if __name__ == "__main__":
    tf.test.main()
