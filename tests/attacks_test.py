"""Tests for s2s_tf.robustness.attacks and runner: budgets, restarts, caching, BPDA."""

import gc
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.robustness import attacks
from s2s_tf.robustness import runner

SHAPE = (8, 8, 3)
NUM_CLASSES = 4
EPS = {attacks.LINF: 0.06, attacks.L2: 0.8}
# Small settings for the slow attacks; shared by the tests so compiled attacks are reused.
FAST = {
    "spsa": {"steps": 40, "spsa_samples": 32},
    "cw_l2": {"steps": 30, "binary_search_steps": 3},
}
FEW = 6  # examples for SPSA and CW


def _synthetic(rng, templates, n):
    """Noisy copies of one template per class: separable, but close enough to attack."""
    labels = rng.integers(0, NUM_CLASSES, n)
    images = templates[labels] + rng.normal(0.0, 0.05, (n, *SHAPE))
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels.astype(np.int32)


def _tiny_model(name="tiny"):
    inputs = keras.Input(SHAPE)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, activation="tanh")(x)  # no dead (flat) regions
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x), name=name)


class _CountingModel(keras.Model):
    """Calls a model and counts Python calls, i.e. traces once compiled."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def call(self, x):
        self.calls += 1
        return self.inner(x)


def _wide_model():
    """An untrained 10-class model (enough classes for every registered attack)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Dense(16, activation="tanh")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="wide")


def _near_range_ends(model, n):
    """Images with every pixel within 0.02 of 0 or 1 (a quarter exactly at the ends), so
    any step of an attack leaves [0, 1] unless it clips; labels are the model's own
    predictions, so no example starts out fooled."""
    rng = np.random.default_rng(2)
    x = rng.uniform(0.0, 0.02, (n, *SHAPE))
    high = rng.uniform(size=x.shape) < 0.5
    x = np.where(high, 1.0 - x, x)
    x[:, :2] = high[:, :2]
    x = x.astype(np.float32)
    return x, np.asarray(model(x)).argmax(-1).astype(np.int32)


def _attack_fn_output(name, model, x, y, eps, max_steps=10):
    """Calls the registered attack function itself: no runner, no `enforce_budget`.

    Iterative attacks run at most `max_steps` steps; attacks stepping by a multiple of
    eps take steps of 2 * eps, out of the ball, so only their projection keeps them in.
    """
    spec = attacks.ATTACKS[name]
    params = {**spec.params, **FAST.get(name, {})}
    steps = params.pop("steps", spec.defaults.get("steps"))
    if "step_size" in spec.defaults:
        step_size = spec.defaults["step_size"]
    elif "step_size_factor" in spec.defaults:
        step_size = 2.0 * eps
    else:
        step_size = None  # an attack without a step size (FGSM, noise, APGD, Square)
    adv = spec.fn(
        model,
        x,
        y,
        eps,
        steps=None if steps is None else min(steps, max_steps),
        step_size=step_size,
        targeted=False,
        seed=(5, 6),
        clip_min=0.0,
        clip_max=1.0,
        **params,
    )
    return np.asarray(adv)


def _n(name):
    return FEW if name in FAST else 16


class AttacksTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        templates = 0.5 + rng.uniform(-0.1, 0.1, (NUM_CLASSES, *SHAPE))
        train_x, train_y = _synthetic(rng, templates, 600)
        cls.x, cls.y = _synthetic(rng, templates, 16)
        cls.model = _tiny_model()
        cls.model.compile(
            keras.optimizers.Adam(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        cls.model.fit(train_x, train_y, epochs=10, batch_size=64, verbose=0)
        cls.wide_model = _wide_model()
        cls.ends_x, cls.ends_y = _near_range_ends(cls.wide_model, 4)

    def _attack(self, name, n=None, **kwargs):
        n = n or _n(name)
        kwargs.setdefault("eps", EPS[attacks.ATTACKS[name].norm])
        params = {**FAST.get(name, {}), **kwargs}
        return runner.run_attack(name, self.model, self.x[:n], self.y[:n], **params)

    def test_registry_entries(self):
        self.assertIn("testing", attacks.ATTACKS)
        self.assertContainsSubset(
            {"fgsm", "bim", "pgd", "pgd_l2", "mim", "cw_l2", "spsa"}, attacks.ATTACKS
        )
        for name, spec in attacks.ATTACKS.items():
            self.assertIsInstance(spec, attacks.AttackSpec, name)
            self.assertIn(spec.norm, (attacks.LINF, attacks.L2))
            self.assertTrue(spec.description)
        self.assertFalse(attacks.get_spec("spsa").uses_gradients)
        with self.assertRaisesRegex(ValueError, "Unknown attack"):
            attacks.get_spec("nope")

    @parameterized.parameters(sorted(attacks.ATTACKS))
    def test_attack_function_runs_eagerly(self, name):
        eps = EPS[attacks.ATTACKS[name].norm]
        adv = _attack_fn_output(name, self.model, self.x[:2], self.y[:2], eps)
        self.assertEqual(adv.shape, (2, *SHAPE))

    @parameterized.parameters(sorted(attacks.ATTACKS))
    def test_eps_zero_returns_input(self, name):
        adv = self._attack(name, eps=0.0)
        self.assertAllEqual(adv, self.x[: _n(name)])

    @parameterized.parameters(sorted(attacks.ATTACKS))
    def test_within_budget_and_clip_range(self, name):
        spec = attacks.ATTACKS[name]
        eps = EPS[spec.norm]
        # Pixels at the range ends, to exercise the clipping.
        rng = np.random.default_rng(1)
        x = self.x[: _n(name)].copy()
        x[:, :2] = rng.integers(0, 2, x[:, :2].shape)
        y = self.y[: len(x)]
        adv = runner.run_attack(name, self.model, x, y, eps, **FAST.get(name, {}))
        self.assertEqual(adv.dtype, np.float32)
        self.assertAllInRange(adv, 0.0, 1.0)
        delta = (adv - x).reshape(len(x), -1)
        if spec.norm == attacks.LINF:
            self.assertLessEqual(np.abs(delta).max(), eps + 1e-6)
        else:
            self.assertLessEqual(np.linalg.norm(delta, axis=1).max(), eps + 1e-5)

    @parameterized.named_parameters((name, name) for name in sorted(attacks.ATTACKS))
    def test_attack_function_itself_keeps_budget_and_clip_range(self, name):
        # `run_attack` re-projects every result (`enforce_budget`), which would hide a
        # projection bug inside an attack: check the attack function's own output.
        spec = attacks.ATTACKS[name]
        eps = EPS[spec.norm]
        n = 2 if name in FAST else 4  # the slow (eager, per-example) attacks get fewer
        x, y = self.ends_x[:n], self.ends_y[:n]
        adv = _attack_fn_output(name, self.wide_model, x, y, eps)
        self.assertEqual(adv.shape, x.shape)
        self.assertAllInRange(adv, 0.0, 1.0)
        delta = (adv - x).reshape(len(x), -1)
        if spec.norm == attacks.LINF:
            self.assertLessEqual(np.abs(delta).max(), eps + 1e-6, name)
        else:
            self.assertLessEqual(np.linalg.norm(delta, axis=1).max(), eps * (1 + 1e-5), name)
        if spec.uses_gradients and spec.eps_policy == "project":
            self.assertGreater(np.abs(delta).max(), 0.0, f"{name} did not move")  # not vacuous

    @parameterized.parameters(sorted(set(attacks.ATTACKS) - {"testing"}))
    def test_lowers_accuracy_of_trained_model(self, name):
        n = _n(name)
        clean = runner.accuracy(self.model, self.x[:n], self.y[:n])
        self.assertGreaterEqual(clean, 0.75)
        adv = self._attack(name)
        robust = runner.accuracy(self.model, adv, self.y[:n])
        self.assertLessEqual(robust, clean - 0.5, f"{name}: {clean} -> {robust}")

    def test_random_noise_stays_in_ball_and_is_seeded(self):
        first = self._attack("testing", seed=3)
        self.assertAllEqual(first, self._attack("testing", seed=3))
        self.assertNotAllEqual(first, self._attack("testing", seed=4))
        self.assertGreater(np.abs(first - self.x).max(), 0.9 * EPS[attacks.LINF])

    def test_targeted_pgd_reaches_target(self):
        targets = (self.y + 1) % NUM_CLASSES
        adv = runner.run_attack(
            "pgd", self.model, self.x, self.y, 0.1, targeted=True, target_labels=targets
        )
        reached = np.mean(self.model.predict(adv, verbose=0).argmax(-1) == targets)
        self.assertGreater(reached, 1.0 / NUM_CLASSES + 0.3)

    def test_restarts_never_lower_success(self):
        eps = 0.045  # some examples resist, so restarts have work to do
        single = self._attack("pgd", eps=eps, seed=7)
        multi = self._attack("pgd", eps=eps, seed=7, restarts=4)
        self.assertAllEqual(single, self._attack("pgd", eps=eps, seed=7))
        fooled_single = self.model.predict(single, verbose=0).argmax(-1) != self.y
        fooled_multi = self.model.predict(multi, verbose=0).argmax(-1) != self.y
        self.assertBetween(fooled_single.sum(), 1, len(self.x) - 1)
        self.assertTrue(np.all(fooled_multi[fooled_single]))
        self.assertGreaterEqual(fooled_multi.sum(), fooled_single.sum())
        self.assertLessEqual(np.abs(multi - self.x).max(), eps + 1e-6)

    def test_compiled_attack_is_cached_without_retracing(self):
        model = _CountingModel(self.model)
        runner.run_attack("pgd", model, self.x, self.y, 0.03, seed=1)
        traced = model.calls
        self.assertGreater(traced, 0)
        # Another eps, step size and seed: the same compiled function, no new trace.
        runner.run_attack("pgd", model, self.x, self.y, 0.05, step_size=0.01, seed=2)
        self.assertEqual(model.calls, traced)
        compiled = runner.compiled_attack("pgd", model)
        self.assertIs(compiled, runner.compiled_attack("pgd", model))
        self.assertEqual(compiled.experimental_get_tracing_count(), 1)
        self.assertIsNot(compiled, runner.compiled_attack("pgd", model, steps=3))
        # Other batch sizes: one more trace (unknown batch size), then none.
        runner.run_attack("pgd", model, self.x[:5], self.y[:5], 0.05)
        runner.run_attack("pgd", model, self.x[:7], self.y[:7], 0.05)
        runner.run_attack("pgd", model, self.x, self.y, 0.05, batch_size=3)
        self.assertLessEqual(compiled.experimental_get_tracing_count(), 2)

    def test_cache_does_not_keep_the_model_alive(self):
        model = _tiny_model("temporary")
        runner.run_attack("pgd", model, self.x[:2], self.y[:2], 0.05, steps=2)
        ref = weakref.ref(model)
        del model
        gc.collect()
        self.assertIsNone(ref())

    def test_argument_errors(self):
        with self.assertRaisesRegex(ValueError, "target label"):
            runner.run_attack("pgd", self.model, self.x, self.y, 0.1, targeted=True)
        with self.assertRaisesRegex(ValueError, "eps"):
            runner.run_attack("pgd", self.model, self.x, self.y, -0.1)
        with self.assertRaisesRegex(ValueError, "eps=None"):
            runner.run_attack("pgd", self.model, self.x, self.y, None)
        with self.assertRaisesRegex(ValueError, r"\[clip_min, clip_max\]"):
            runner.run_attack("fgsm", self.model, self.x * 2.0 + 0.5, self.y, 0.1)
        with self.assertRaisesRegex(ValueError, "labels"):
            runner.accuracy(self.model, self.x, self.y[:3])
        with self.assertRaisesRegex(ValueError, "no parameters"):
            runner.run_attack("pgd", self.model, self.x, self.y, 0.1, decay_factor=0.5)

    def test_cw_without_budget_returns_its_result(self):
        adv = self._attack("cw_l2", eps=None)
        norms = np.linalg.norm((adv - self.x[:FEW]).reshape(FEW, -1), axis=1)
        self.assertTrue(np.all(norms > 0.0))
        # Budgets below the CW norms reject those examples (returned unchanged).
        budget = float(np.median(norms))
        capped = self._attack("cw_l2", eps=budget)
        for i, norm in enumerate(norms):
            self.assertAllEqual(capped[i], adv[i] if norm <= budget else self.x[i])

    def test_accuracy_matches_argmax(self):
        logits = self.model.predict(self.x, verbose=0)
        expected = np.mean(logits.argmax(-1) == self.y)
        self.assertAllClose(runner.accuracy(self.model, self.x, self.y, batch_size=5), expected)


class BpdaTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        inputs = keras.Input(SHAPE)
        x = keras.layers.Conv2D(3, 3, padding="same")(inputs)
        x = keras.layers.Activation(keras.ops.square)(x)  # non-trivial, non-linear purifier
        self.purifier = keras.Model(inputs, x, name="purifier")
        self.classifier = _tiny_model("classifier")
        self.x = tf.random.uniform((4, *SHAPE), seed=1)
        self.y = tf.constant([0, 1, 2, 0])

    def _grad(self, model_fn, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(self.y, model_fn(x))
        return tape.gradient(loss, x)

    def test_forward_is_the_composition(self):
        model_fn = runner.bpda_model_fn(self.purifier, self.classifier)
        self.assertAllEqual(model_fn(self.x), self.classifier(self.purifier(self.x)))

    def test_gradient_is_classifier_gradient_at_purified_input(self):
        model_fn = runner.bpda_model_fn(self.purifier, self.classifier)
        purified = self.purifier(self.x)
        expected = self._grad(self.classifier, purified)
        self.assertAllClose(self._grad(model_fn, self.x), expected, atol=1e-6)
        full = self._grad(lambda x: self.classifier(self.purifier(x)), self.x)
        self.assertGreater(float(tf.reduce_max(tf.abs(full - expected))), 1e-4)

    def test_runs_under_run_attack(self):
        model_fn = runner.bpda_model_fn(self.purifier, self.classifier)
        x = self.x.numpy()
        adv = runner.run_attack("pgd", model_fn, x, self.y.numpy(), 0.05)
        self.assertLessEqual(np.abs(adv - x).max(), 0.05 + 1e-6)
        self.assertGreater(np.abs(adv - x).max(), 0.0)


if __name__ == "__main__":
    tf.test.main()
