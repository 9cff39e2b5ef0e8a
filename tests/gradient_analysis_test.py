"""Tests for the input-gradient analysis."""

import gc
import json
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.analysis import gradient_analysis as ga
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import s2s_model

SHAPE = (8, 8, 3)


def _tiny_classifier(num_classes=4, shape=SHAPE):
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, activation="tanh")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def _rectangle_images(num, size=32, seed=0):
    """Piecewise-constant RGB images: a few random rectangles on a flat background."""
    rng = np.random.default_rng(seed)
    images = np.full((num, size, size, 3), 0.2, np.float32)
    for image in images:
        for _ in range(3):
            top, left = rng.integers(2, size - 10, 2)
            height, width = rng.integers(4, 10, 2)
            image[top : top + height, left : left + width] = rng.uniform(0.3, 1.0, 3)
    return images


def _two_logits(score):
    """Logits [score, -score]: class 0's gradient is d score / dx."""
    return tf.stack([score, -score], axis=1)


class GradientTest(tf.test.TestCase, parameterized.TestCase):
    def setUp(self):
        super().setUp()
        keras.utils.set_random_seed(0)
        self.model = _tiny_classifier()
        self.images = np.random.default_rng(1).uniform(size=(5, *SHAPE)).astype(np.float32)
        self.labels = np.array([0, 1, 2, 3, 1])

    def test_input_gradients_match_a_manual_tape(self):
        grads = ga.input_gradients(self.model, self.images, self.labels, batch_size=2)
        self.assertEqual(grads.shape, self.images.shape)
        x = tf.constant(self.images[3:4])
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits([3], self.model(x))
        self.assertAllClose(grads[3:4], tape.gradient(loss, x), atol=1e-6)
        self.assertGreater(np.abs(grads).max(), 0.0)

    def test_input_gradients_return_the_logits(self):
        _, logits = ga.input_gradients(self.model, self.images, self.labels, return_logits=True)
        self.assertAllClose(logits, self.model(self.images), atol=1e-5)

    @parameterized.parameters(*ga.CLASS_GRADIENT_METHODS)
    def test_class_logit_gradients_match_a_manual_tape(self, method):
        grads = ga.class_logit_gradients(self.model, self.images, batch_size=2, method=method)
        self.assertEqual(grads.shape, (5, 4, *SHAPE))
        x = tf.constant(self.images[4:])
        with tf.GradientTape() as tape:
            tape.watch(x)
            logit = self.model(x)[0, 2]
        self.assertAllClose(grads[4, 2], tape.gradient(logit, x)[0], atol=1e-6)

    @parameterized.parameters(*ga.CLASS_GRADIENT_METHODS)
    def test_class_selections_pick_the_right_logits(self, method):
        every = ga.class_logit_gradients(self.model, self.images, method=method)
        first = ga.class_logit_gradients(self.model, self.images, num_classes=2, method=method)
        self.assertAllClose(first, every[:, :2], atol=1e-6)
        top = ga.top_k_classes(self.model, self.images, k=2)
        self.assertAllEqual(top[:, 0], np.argmax(self.model(self.images), axis=-1))
        per_image = ga.class_logit_gradients(self.model, self.images, classes=top, method=method)
        expected = np.take_along_axis(every, top[:, :, None, None, None], axis=1)
        self.assertAllClose(per_image, expected, atol=1e-6)
        with self.assertRaisesRegex(ValueError, "not both"):
            ga.class_logit_gradients(self.model, self.images, classes=[0], num_classes=1)

    def test_gradient_functions_are_traced_once_per_model(self):
        traces = []

        def model_fn(x):
            traces.append(1)  # Python side effect: runs only while tracing
            return self.model(x)

        # Different image counts and a partial last batch reuse the first trace.
        ga.input_gradients(model_fn, self.images, self.labels, batch_size=2)
        ga.input_gradients(model_fn, self.images[:3], self.labels[:3], batch_size=4)
        self.assertLen(traces, 1)
        ga.class_logit_gradients(model_fn, self.images, num_classes=2, batch_size=2)
        ga.class_logit_gradients(model_fn, self.images[:1], num_classes=2, batch_size=2)
        self.assertLen(traces, 2)
        # A bound method is a new object on each access but the same model.
        ga.input_gradients(self.model.__call__, self.images, self.labels)
        ga.input_gradients(self.model.__call__, self.images, self.labels)
        self.assertLen(ga._FN_CACHE[self.model], 1)

    def test_the_cache_does_not_keep_models_alive(self):
        model = _tiny_classifier()
        ga.input_gradients(model, self.images, self.labels)
        model_ref = weakref.ref(model)
        del model
        gc.collect()
        self.assertIsNone(model_ref())


class ClassSpecificityTest(tf.test.TestCase):
    def test_known_cosines(self):
        e1, e2 = np.eye(2)
        grads = np.stack([[e1, e1 + e2], [e1, -e1], [e1, e2]])[..., None]  # [3, 2, 2, 1]
        result = ga.class_specificity(grads)
        self.assertAllClose(result["per_image"], [np.sqrt(0.5), -1.0, 0.0])
        self.assertAllClose(result["mean"], (np.sqrt(0.5) - 1.0) / 3)
        with self.assertRaisesRegex(ValueError, "K>=2"):
            ga.class_specificity(grads[:, :1])

    def test_is_one_when_all_logits_are_the_same_function(self):
        def model_fn(x):
            f = tf.reduce_sum(tf.sin(3.0 * x) * x, axis=[1, 2, 3])
            return tf.stack([f, 2.0 * f, 0.5 * f], axis=1)

        images = np.random.default_rng(0).uniform(size=(3, *SHAPE)).astype(np.float32)
        result = ga.class_specificity(ga.class_logit_gradients(model_fn, images))
        self.assertAllClose(result["per_image"], [1.0] * 3, atol=1e-5)

    def test_is_near_zero_for_a_linear_model_with_orthogonal_class_weights(self):
        dim = int(np.prod(SHAPE))
        weights, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(dim, 4)))
        weights = tf.constant(weights, tf.float32)

        def model_fn(x):
            return tf.reshape(x, (-1, dim)) @ weights

        images = np.random.default_rng(1).uniform(size=(3, *SHAPE)).astype(np.float32)
        result = ga.class_specificity(ga.class_logit_gradients(model_fn, images))
        self.assertAllClose(result["per_image"], [0.0] * 3, atol=1e-5)


class StructureAlignmentTest(tf.test.TestCase):
    def test_sobel_edge_magnitude_of_a_step_edge(self):
        gray = np.zeros((1, 6, 8, 1), np.float32)
        gray[..., 4:, :] = 1.0
        magnitude = ga.sobel_edge_magnitude(gray).numpy()
        expected = np.zeros((1, 6, 8))
        expected[..., 3:5] = 4.0  # the kernel's column weights 1 + 2 + 1, either side
        self.assertAllClose(magnitude, expected, atol=1e-5)
        # RGB goes through grayscale first (its weights sum to 0.9999, not 1).
        rgb = np.repeat(gray, 3, axis=-1)
        self.assertAllClose(ga.sobel_edge_magnitude(rgb), magnitude, atol=1e-3)

    def test_high_for_a_model_driven_by_edge_energy(self):
        def edge_energy(x):
            sobel = tf.image.sobel_edges(tf.image.rgb_to_grayscale(x))
            return _two_logits(tf.reduce_sum(tf.square(sobel), axis=[1, 2, 3, 4]))

        images = _rectangle_images(4)
        grads = ga.input_gradients(edge_energy, images, labels=[1, 1, 1, 1])
        result = ga.structure_alignment(grads, images)
        self.assertGreater(min(result["per_image"]), 0.5)

    def test_near_zero_for_a_spatially_random_gradient(self):
        images = _rectangle_images(4)
        mask = tf.constant(np.random.default_rng(0).normal(size=images.shape[1:]), tf.float32)

        def masked_sum(x):
            return _two_logits(tf.reduce_sum(x * mask, axis=[1, 2, 3]))

        grads = ga.input_gradients(masked_sum, images, labels=[1, 1, 1, 1])
        result = ga.structure_alignment(grads, images)
        self.assertLess(np.abs(result["per_image"]).max(), 0.2)

    def test_exact_values(self):
        images = _rectangle_images(2)
        edges = ga.sobel_edge_magnitude(images).numpy()[..., None]
        aligned = ga.structure_alignment(np.repeat(-edges, 3, axis=-1), images)
        self.assertAllClose(aligned["per_image"], [1.0, 1.0])
        # A constant |gradient| has no defined correlation; it scores 0.
        flat = ga.structure_alignment(np.ones_like(images), images)
        self.assertAllClose(flat["per_image"], [0.0, 0.0])


class GradientStatisticsTest(tf.test.TestCase):
    def test_matches_numpy(self):
        grads = np.array([[-3.0, -1.0, 0.0, 0.0], [1.0, 2.0, 5.0, 0.0]])
        stats = ga.gradient_statistics(grads, bins=4, range_percentile=100, zero_rtol=0.1)
        self.assertAllClose(stats["mean"], grads.mean())
        self.assertAllClose(stats["std"], grads.std())
        self.assertAllClose(stats["mean_abs"], 1.5)
        self.assertAllClose(stats["max_abs"], 5.0)
        self.assertAllClose(stats["l2_norm_mean"], (np.sqrt(10.0) + np.sqrt(30.0)) / 2)
        self.assertAllClose(stats["near_zero_fraction"], 3 / 8)
        self.assertAllClose(stats["percentiles"]["50"], 0.0)
        self.assertAllClose(stats["percentiles"]["99"], np.percentile(grads, 99))
        self.assertAllClose(stats["histogram"]["edges"], [-5.0, -2.5, 0.0, 2.5, 5.0])
        self.assertEqual(stats["histogram"]["counts"], [1, 1, 5, 1])

    def test_histogram_keeps_every_entry(self):
        grads = np.random.default_rng(0).standard_cauchy(size=(4, 500))
        stats = ga.gradient_statistics(grads, bins=7, range_percentile=90)
        self.assertEqual(sum(stats["histogram"]["counts"]), grads.size)
        self.assertLen(stats["histogram"]["edges"], 8)
        self.assertAllClose(stats["histogram"]["range"], np.percentile(np.abs(grads), 90))

    def test_kurtosis_is_pearsons(self):
        rng = np.random.default_rng(0)
        normal = ga.gradient_statistics(rng.normal(size=(10, 20000)))
        self.assertNear(normal["kurtosis"], 3.0, 0.1)
        uniform = ga.gradient_statistics(rng.uniform(-1, 1, size=(10, 20000)))
        self.assertNear(uniform["kurtosis"], 1.8, 0.05)

    def test_all_zero_gradients(self):
        stats = ga.gradient_statistics(np.zeros((2, 3)), bins=3)
        self.assertEqual(stats["kurtosis"], 0.0)
        self.assertEqual(stats["near_zero_fraction"], 1.0)
        self.assertEqual(sum(stats["histogram"]["counts"]), 6)


class CompareModelsTest(tf.test.TestCase):
    def test_report_is_json_serialisable_and_complete(self):
        keras.utils.set_random_seed(0)
        classifier = _tiny_classifier(num_classes=3)
        autoencoder = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))), input_shape=SHAPE
        )
        models = {
            "classifier": classifier,
            "defended": s2s_model.build_s2s_model(autoencoder, classifier),
        }
        images = np.random.default_rng(0).uniform(size=(5, *SHAPE)).astype(np.float32)
        labels = [0, 1, 2, 0, 1]
        result = ga.compare_models(models, images, labels, top_k=2, batch_size=2, bins=9)

        metrics = json.loads(json.dumps(result["metrics"]))
        self.assertEqual(metrics["num_images"], 5)
        for name in models:
            report = metrics["models"][name]
            self.assertLen(report["class_specificity"]["per_image"], 5)
            self.assertLen(report["structure_alignment"]["per_image"], 5)
            self.assertEqual(report["num_classes_compared"], 2)
            self.assertEqual(
                sum(report["loss_gradient_statistics"]["histogram"]["counts"]), 5 * 192
            )
            expected = ga.input_gradients(models[name], images[:4], labels[:4])
            self.assertAllClose(result["examples"]["loss_gradients"][name], expected)
        self.assertEqual(result["examples"]["edge_magnitude"].shape, (4, 8, 8))
        with self.assertRaisesRegex(ValueError, "at most one"):
            ga.compare_models(models, images, labels, num_classes=2, top_k=2)


if __name__ == "__main__":
    tf.test.main()
