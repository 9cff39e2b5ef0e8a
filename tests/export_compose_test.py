"""The exported signatures compose: serving_default(x) == classify_undefended(purify(x)).

Anyone attacking the exported model through `purify` and `classify_undefended`
relies on this. The autoencoder here is made to reconstruct outside [0, 1] (its
final conv's bias), where an unclipped composite and the clipped `purify` part
ways; a file saved before the composite clipped is exported too.
"""

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.export import export_lib
from s2s_tf.export import serving_files
from s2s_tf.export import signatures
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import preprocessing
from s2s_tf.models import s2s_model

SIZE = (16, 16)
NUM_CLASSES = 10
# conv_final biases in the normalised space: red above 1 and green below 0 after
# Denormalize for most pixels, blue around the ImageNet mean.
OUT_OF_RANGE_BIAS = (2.5, -2.5, 0.0)
TOLERANCE = 1e-5


def _unclipped_composite(autoencoder, classifier):
    """The composite as saved before it clipped: Denormalize straight into the classifier."""
    inputs = keras.Input((*SIZE, 3), name="image")
    x = preprocessing.Normalize(name="ae_normalize")(inputs)
    x = s2s_model._renamed(autoencoder, s2s_model.AUTOENCODER_NAME)(x)
    x = preprocessing.Denormalize(name="ae_denormalize")(x)
    logits = s2s_model._renamed(classifier, s2s_model.CLASSIFIER_NAME)(x)
    return keras.Model(inputs, logits, name="s2s_defended")


class ComposeTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.dir = tempfile.mkdtemp()
        cls.autoencoder = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,), (8,))), input_shape=(*SIZE, 3)
        )
        conv = ae_lib.get_decoder(cls.autoencoder).get_layer("conv_final")
        conv.bias.assign(np.asarray(OUT_OF_RANGE_BIAS, np.float32))
        cls.classifier = classifiers.build_classifier_with_preprocessing(
            "testing", SIZE, NUM_CLASSES
        )
        cls.images = serving_files.example_images(8, SIZE, seed=5)
        normalised = preprocessing.Normalize()(cls.images)
        cls.raw = preprocessing.Denormalize()(cls.autoencoder(normalised)).numpy()
        cls.loaded = {}
        for kind, model in (
            ("current", s2s_model.build_s2s_model(cls.autoencoder, cls.classifier)),
            ("unclipped_file", _unclipped_composite(cls.autoencoder, cls.classifier)),
        ):
            path = os.path.join(cls.dir, f"{kind}.keras")
            model.save(path)
            config = export_lib.ExportConfig(
                export_base=os.path.join(cls.dir, kind), defended_path=path
            )
            cls.loaded[kind] = tf.saved_model.load(export_lib.export(config))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)
        super().tearDownClass()

    def _signature(self, kind, name, images):
        return self.loaded[kind].signatures[name](images=tf.constant(images))

    def test_reconstructions_leave_the_unit_interval(self):
        outside = np.mean((self.raw < 0.0) | (self.raw > 1.0))
        self.assertGreater(outside, 0.3)
        self.assertLess(outside, 0.9)  # and some pixels stay inside

    @parameterized.parameters("current", "unclipped_file")
    def test_serving_default_is_classify_undefended_of_purify(self, kind):
        purified = self._signature(kind, signatures.PURIFY_SIGNATURE, self.images)
        purified = purified[signatures.PURIFIED_OUTPUT].numpy()
        self.assertAllClose(purified, np.clip(self.raw, 0.0, 1.0), atol=1e-5)
        composed = self._signature(kind, signatures.UNDEFENDED_SIGNATURE, purified)
        served = self._signature(kind, signatures.DEFAULT_SIGNATURE, self.images)
        for key in signatures.CLASSIFICATION_OUTPUTS:
            self.assertAllClose(served[key], composed[key], rtol=TOLERANCE, atol=TOLERANCE, msg=key)

    def test_the_unclipped_reconstruction_gives_other_logits(self):
        """What an unclipped composite would serve: far outside the test's tolerance.

        (The in-memory classifier: the signature would clip its out-of-range input.)
        """
        unclipped = self.classifier(self.raw).numpy()
        served = self._signature("current", signatures.DEFAULT_SIGNATURE, self.images)
        difference = np.abs(unclipped - served["logits"].numpy()).max()
        self.assertGreater(difference, 100 * TOLERANCE)


if __name__ == "__main__":
    tf.test.main()
