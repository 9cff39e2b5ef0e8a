"""Tests for s2s_tf.cleverhans_shim: CW-L2 and SPSA on Keras 3 models."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from cleverhans.tf2.attacks import spsa as spsa_lib

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import preprocessing
from s2s_tf.models import s2s_model
from s2s_tf.robustness import cleverhans_shim

SHAPE = (8, 8, 3)
NUM_CLASSES = 3


def _linear_model(seed=0):
    """A functional linear classifier with fixed random weights (easy to attack)."""
    inputs = keras.Input(SHAPE)
    dense = keras.layers.Dense(NUM_CLASSES)
    outputs = dense(keras.layers.Flatten()(inputs))
    rng = np.random.default_rng(seed)
    dense.set_weights([rng.normal(0.0, 0.1, (np.prod(SHAPE), NUM_CLASSES)), np.zeros(3)])
    return keras.Model(inputs, outputs, name="linear")


def _nested_model():
    """The project's composite: an autoencoder model and a classifier model nested in one.

    The BatchNorm statistics are those of [0, 1] images (momentum 0: one training-mode
    call sets them), as after training; with the initial ones (mean 0, variance 1) the
    reconstruction hardly depends on the input and no attack gets anywhere.
    """
    keras.utils.set_random_seed(0)
    autoencoder = ae_lib.build_autoencoder(
        ae_lib.AutoencoderConfig(stage_widths=((4,), (4,)), bn_momentum=0.0), input_shape=SHAPE
    )
    autoencoder(preprocessing.Normalize()(_images(16, seed=9)), training=True)
    return s2s_model.build_s2s_model(autoencoder, _linear_model(1))


def _model(kind):
    return _linear_model() if kind == "functional" else _nested_model()


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(0.2, 0.8, (n, *SHAPE)).astype(np.float32)


def _margins(model, x, labels):
    """Highest other logit minus the label's logit (> 0: not classified as the label)."""
    logits = np.asarray(model(x)).copy()
    rows = np.arange(len(labels))
    label_logits = logits[rows, labels]
    logits[rows, labels] = -np.inf
    return logits.max(-1) - label_logits


class SpsaTest(tf.test.TestCase, parameterized.TestCase):
    def test_stock_spsa_adam_fails_on_keras3(self):
        # The root cause the shim works around: Keras 3's Adam rejects `lr`.
        with self.assertRaisesRegex(ValueError, "lr"):
            spsa_lib.SPSAAdam(lr=0.01)

    def test_spsa_adam_is_plain_and_takes_an_adam_step(self):
        optimizer = cleverhans_shim.SPSAAdam(lr=0.1, num_samples=4)
        self.assertNotIsInstance(optimizer, keras.optimizers.Optimizer)
        x = tf.constant([[1.0, 2.0]])
        grad = tf.constant([[0.5, -2.0]])
        state = optimizer.init_state([x])
        (new_x,), new_state = optimizer._apply_gradients([grad], [x], state)
        # First bias-corrected Adam step: lr * g / (|g| + epsilon).
        self.assertAllClose(new_x, [[0.9, 2.1]], atol=1e-5)
        self.assertEqual(float(new_state["t"]), 1.0)
        with self.assertRaisesRegex(ValueError, "even"):
            cleverhans_shim.SPSAAdam(num_samples=3)

    @parameterized.parameters("functional", "nested")
    def test_spsa_runs_eagerly_and_in_tf_function(self, kind):
        model = _model(kind)
        x, y, eps = tf.constant(_images(1)), tf.constant([1]), 0.05

        def attack(x, y):
            return cleverhans_shim.spsa(model, x, y, eps, 3, 0.0, 1.0, spsa_samples=8)

        for adv in (attack(x, y), tf.function(attack)(x, y)):
            self.assertEqual(adv.shape, (1, *SHAPE))
            self.assertAllInRange(adv, 0.0, 1.0)
            self.assertLessEqual(float(tf.reduce_max(tf.abs(adv - x))), eps + 1e-6)

    def test_spsa_retraces_with_new_shapes(self):
        inputs = keras.Input((None, None, 3))
        pooled = keras.layers.GlobalAveragePooling2D()(inputs)
        model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(pooled))
        attack = tf.function(
            lambda x: cleverhans_shim.spsa(
                model, x, tf.constant([0]), 0.1, 2, 0.0, 1.0, spsa_samples=4
            )
        )
        for size in (4, 6):
            self.assertEqual(attack(tf.fill((1, size, size, 3), 0.5)).shape, (1, size, size, 3))
        self.assertEqual(attack.experimental_get_tracing_count(), 2)

    def test_spsa_lowers_margin(self):
        model = _linear_model()
        x = _images(1)
        label = np.asarray(model(x)).argmax(-1)
        adv = cleverhans_shim.spsa(
            model, tf.constant(x), tf.constant(label), 0.1, 20, 0.0, 1.0, spsa_samples=32
        )
        self.assertGreater(_margins(model, adv, label)[0], _margins(model, x, label)[0] + 0.1)


class CarliniWagnerTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        self.model = _linear_model()
        self.x = _images(4)
        self.labels = np.asarray(self.model(self.x)).argmax(-1)

    def _attack(self, model=None, **kwargs):
        kwargs = {"max_iterations": 30, "binary_search_steps": 3, "learning_rate": 0.05, **kwargs}
        return cleverhans_shim.CarliniWagnerL2(model or self.model, **kwargs)

    @parameterized.parameters("functional", "nested")
    def test_runs_on_keras3_models(self, kind):
        model = _model(kind)
        labels = np.asarray(model(self.x)).argmax(-1)
        adv = cleverhans_shim.carlini_wagner_l2(
            model, self.x, y=labels, max_iterations=5, binary_search_steps=2
        )
        self.assertEqual(adv.shape, self.x.shape)
        self.assertAllInRange(adv, 0.0, 1.0)

    def test_untargeted_with_true_labels_fools_the_model(self):
        # CleverHans ran a targeted attack towards y whenever y was given.
        adv = self._attack(y=self.labels).attack(self.x)
        self.assertTrue(np.all(_margins(self.model, adv, self.labels) > 0.0))
        self.assertLess(np.abs(adv - self.x).max(), 0.5)

    def test_targeted_reaches_target(self):
        targets = (self.labels + 1) % NUM_CLASSES
        adv = self._attack(y=targets, targeted=True).attack(self.x)
        self.assertAllEqual(np.asarray(self.model(adv)).argmax(-1), targets)

    def test_learning_rate_survives_optimizer_reset(self):
        # Zeroing every optimizer variable (the obvious Keras 3 port) zeroes the learning
        # rate: the attack would never move and this test fails.
        attack = self._attack(y=self.labels)
        adv = attack.attack(self.x)
        state = attack.state(self.x.shape)
        self.assertAllClose(state.optimizer.learning_rate, 0.05)
        self.assertTrue(np.all(_margins(self.model, adv, self.labels) > 0.0))
        # The iteration count restarts at each binary-search step.
        self.assertLessEqual(int(state.optimizer.iterations), 30)
        self.assertGreater(int(state.optimizer.iterations), 0)

    def test_zeroing_all_optimizer_variables_kills_the_learning_rate(self):
        # Why `reset_optimizer` restores built values instead of assigning zeros.
        attack = self._attack(y=self.labels)
        state = attack.state(self.x.shape)
        for variable in state.optimizer.variables:
            variable.assign(tf.zeros_like(variable))
        self.assertEqual(float(state.optimizer.learning_rate), 0.0)
        attack.reset_optimizer(state)
        self.assertAllClose(state.optimizer.learning_rate, 0.05)

    def test_rgb_batch_matches_single_examples(self):
        # cleverhans#1205: `const` had the image shape, mixing the examples of a batch.
        attack = self._attack(y=self.labels, abort_early=False, max_iterations=15)
        batch = attack.attack(self.x)
        for i in range(len(self.x)):
            single = self._attack(y=self.labels[i : i + 1], abort_early=False, max_iterations=15)
            self.assertAllClose(batch[i : i + 1], single.attack(self.x[i : i + 1]), atol=1e-4)

    def test_labels_longer_than_batch_size(self):
        adv = self._attack(y=self.labels, batch_size=3, max_iterations=5).attack(self.x)
        self.assertEqual(adv.shape, self.x.shape)

    def test_confidence_moves_the_label_logit_only(self):
        plain = self._attack(y=self.labels).attack(self.x)
        confident = self._attack(y=self.labels, confidence=1.0).attack(self.x)
        # Examples the attack fails on come back unchanged; the others keep the margin.
        found = np.any(confident != self.x, axis=(1, 2, 3))
        self.assertGreaterEqual(found.sum(), 2)
        margins = _margins(self.model, confident, self.labels)[found]
        self.assertTrue(np.all(margins >= 1.0 - 1e-3), margins)
        self.assertGreater(margins.min(), _margins(self.model, plain, self.labels).max())

    def test_binary_search_follows_carlini_wagner(self):
        attack = self._attack(y=self.labels)
        lab = tf.constant([0, 0, 0])
        # Successful example 0 (bounded after), failed 1 (no upper bound: x10), failed 2
        # (upper bound known: bisect).
        const, lower, upper = attack._update_const(
            const=tf.constant([1.0, 1.0, 1.0]),
            lower_bound=tf.constant([0.0, 0.0, 0.0]),
            upper_bound=tf.constant([1e10, 1e10, 4.0]),
            step_score=tf.constant([2, -1, -1]),
            lab=lab,
        )
        self.assertAllClose(const, [0.5, 10.0, 2.5])
        self.assertAllClose(lower, [0.0, 1.0, 1.0])
        self.assertAllClose(upper, [1.0, 1e10, 4.0])


class CompositeModelTest(tf.test.TestCase):
    """CW-L2 and SPSA must defeat the nested composite (autoencoder -> classifier) model."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = _nested_model()
        cls.x = _images(4)
        cls.labels = np.asarray(cls.model(cls.x)).argmax(-1)

    def _cw(self, binary_search_steps):
        attack = cleverhans_shim.CarliniWagnerL2(
            self.model,
            y=self.labels,
            max_iterations=30,
            binary_search_steps=binary_search_steps,
            learning_rate=0.05,
            initial_const=10.0,  # succeeds at once; the search then trades success for distance
        )
        adv = attack.attack(self.x)
        return adv, np.linalg.norm((adv - self.x).reshape(len(adv), -1), axis=1)

    def test_cw_fools_it_and_the_binary_search_shrinks_the_distance(self):
        self.assertTrue(np.all(_margins(self.model, self.x, self.labels) < 0.0))
        one, one_l2 = self._cw(binary_search_steps=1)
        five, five_l2 = self._cw(binary_search_steps=5)
        for adv in (one, five):
            self.assertTrue(np.all(_margins(self.model, adv, self.labels) > 0.0))
        self.assertAllInRange(five, 0.0, 1.0)
        # Later steps lower the constant and keep the smallest successful perturbation.
        self.assertTrue(np.all(five_l2 <= one_l2 + 1e-6), (one_l2, five_l2))
        self.assertLess(five_l2.mean(), 0.8 * one_l2.mean(), (one_l2, five_l2))

    def test_spsa_fools_it(self):
        tf.random.set_seed(0)  # SPSA draws from TF's global generator
        eps = 0.1
        x, label = self.x[:1], self.labels[:1]
        adv = cleverhans_shim.spsa(
            self.model, tf.constant(x), tf.constant(label), eps, 20, 0.0, 1.0, spsa_samples=32
        )
        self.assertLess(_margins(self.model, x, label)[0], 0.0)
        self.assertGreater(_margins(self.model, adv, label)[0], 0.0)
        self.assertLessEqual(np.abs(adv - x).max(), eps + 1e-6)


if __name__ == "__main__":
    tf.test.main()
