"""Numerical checks of the defended model's input gradients: exported, and under BPDA.

Attacks, the gradient analysis and the robustness report all trust these
gradients. Here they are compared with central finite differences of the
exported SavedModel's `serving_default` signature, and BPDA's straight-through
gradient with the classifier's gradient at the reconstruction.
"""

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from s2s_tf.export import export_lib
from s2s_tf.export import signatures
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import preprocessing
from s2s_tf.models import s2s_model
from s2s_tf.robustness import runner

# 8x8 keeps the pooling windows few, so a finite-difference step rarely flips an argmax
# (an unpooled value then jumps to another pixel: the model is discontinuous there).
SIZE = (8, 8)
NUM_CLASSES = 10
# Float32 model: at this step round-off costs ~0.2 % of the gradient's norm.
STEP = 1e-3
REL_TOLERANCE = 0.03


def _tiny_models():
    """A tiny autoencoder (BatchNorm statistics of real-looking images) and classifier."""
    keras.utils.set_random_seed(0)
    config = ae_lib.AutoencoderConfig(stage_widths=((4,), (8,)), bn_momentum=0.0)
    autoencoder = ae_lib.build_autoencoder(config, input_shape=(*SIZE, 3))
    # Momentum 0: one training-mode call sets the statistics; the initial ones (0 and 1)
    # make a reconstruction that hardly depends on the input.
    images = np.random.default_rng(9).uniform(0.1, 0.9, (16, *SIZE, 3)).astype(np.float32)
    autoencoder(preprocessing.Normalize()(images), training=True)
    classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, NUM_CLASSES)
    return autoencoder, classifier


def _gradient(fn, x):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = tf.reduce_sum(fn(x))
    grad = tape.gradient(value, x)
    return None if grad is None else grad.numpy()


def _central_differences(fn, x, step):
    """d fn / d x of one float32 example by central differences; `fn`: [B, ...] -> [B].

    The step is the one float32 really takes (x + step is rounded), measured per pixel.
    """
    eye = np.eye(x.size, dtype=np.float32).reshape(x.size, *x.shape[1:]) * step
    plus, minus = x + eye, x - eye
    steps = (plus.astype(np.float64) - minus).reshape(x.size, -1).sum(1)  # one nonzero each
    values = np.asarray(fn(np.concatenate([plus, minus])), np.float64)
    return ((values[: x.size] - values[x.size :]) / steps).reshape(x.shape)


class DefendedGradientTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()
        cls.autoencoder, cls.classifier = _tiny_models()
        defended = s2s_model.build_s2s_model(cls.autoencoder, cls.classifier)
        path = os.path.join(cls.dir, "defended.keras")
        defended.save(path)
        config = export_lib.ExportConfig(
            export_base=os.path.join(cls.dir, "export"),
            defended_path=path,
            warmup_batch_sizes=(1,),
        )
        cls.loaded = tf.saved_model.load(export_lib.export(config))
        rng = np.random.default_rng(1)
        # Inside (0, 1), so the signature's out-of-range clipping never acts.
        cls.x = rng.uniform(0.1, 0.9, (1, *SIZE, 3)).astype(np.float32)
        cls.weights = tf.constant(rng.normal(size=(1, NUM_CLASSES)), tf.float32)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)
        super().tearDownClass()

    def _objective(self, logits):
        """A scalar per example that depends on every logit."""
        return tf.reduce_sum(self.weights * logits, axis=-1)

    def test_exported_gradient_matches_finite_differences(self):
        serve = self.loaded.signatures[signatures.DEFAULT_SIGNATURE]

        def objective(images):
            return self._objective(serve(images=tf.convert_to_tensor(images))["logits"])

        grad = _gradient(objective, self.x)
        self.assertIsNotNone(grad, "no gradient through serving_default")
        numeric = _central_differences(lambda b: objective(b).numpy(), self.x, STEP)
        self.assertGreater(np.linalg.norm(numeric), 1e-2)  # the check is not 0 == 0
        error = np.linalg.norm(grad - numeric) / np.linalg.norm(numeric)
        self.assertLess(error, REL_TOLERANCE, f"relative L2 error {error:.3g}")

    def test_bpda_gradient_is_the_classifier_gradient_at_the_reconstruction(self):
        purifier = s2s_model.build_purifier(self.autoencoder, (*SIZE, 3))
        bpda = runner.bpda_model_fn(purifier, self.classifier)
        reconstruction = purifier(self.x).numpy()
        self.assertAllClose(bpda(self.x), self.classifier(reconstruction), atol=1e-6)

        def classifier_objective(images):
            return self._objective(self.classifier(images))

        got = _gradient(lambda x: self._objective(bpda(x)), self.x)
        want = _gradient(classifier_objective, reconstruction)
        self.assertAllClose(got, want, rtol=1e-5, atol=1e-7)
        # Neither the gradient at the clean image nor the end-to-end one: the check can
        # tell BPDA from both.
        at_clean = _gradient(classifier_objective, self.x)
        full = _gradient(lambda x: self._objective(self.classifier(purifier(x))), self.x)
        for other in (at_clean, full):
            self.assertGreater(np.linalg.norm(want - other), 0.1 * np.linalg.norm(want))


if __name__ == "__main__":
    tf.test.main()
