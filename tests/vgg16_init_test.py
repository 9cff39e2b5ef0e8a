"""Tests for initialising the encoder from Keras VGG16 weights."""

import os
import tempfile

import keras
import tensorflow as tf

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import preprocessing
from s2s_tf.models import vgg16_init


class Vgg16InitTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.vgg = keras.applications.VGG16(include_top=False, weights=None)
        cls.vgg_convs = [
            layer for layer in cls.vgg.layers if isinstance(layer, keras.layers.Conv2D)
        ]

    def test_kernels_are_copied_and_first_layer_adapted(self):
        model = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(num_stages=2))
        copied = vgg16_init.init_encoder_from_vgg16(model, self.vgg)
        self.assertEqual(copied, ["conv11", "conv12", "conv21", "conv22"])
        ours = ae_lib.encoder_conv_layers(model)
        for conv, source in zip(ours[1:], self.vgg_convs[1:4], strict=True):
            self.assertAllEqual(conv.kernel, source.kernel)
            self.assertAllEqual(conv.bias, source.bias)
        expected = vgg16_init.caffe_to_normalized_first_layer(*self.vgg_convs[0].get_weights())
        self.assertAllClose(ours[0].kernel, expected[0])
        self.assertAllClose(ours[0].bias, expected[1])

    def test_unadapted_copy_is_verbatim(self):
        model = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(num_stages=1))
        vgg16_init.init_encoder_from_vgg16(model, self.vgg, adapt_first_layer=False)
        self.assertAllEqual(ae_lib.encoder_conv_layers(model)[0].kernel, self.vgg_convs[0].kernel)

    def test_adapted_first_layer_computes_vgg_function_on_normalised_input(self):
        images = tf.random.uniform((2, 16, 16, 3), seed=0)
        caffe = keras.applications.vgg16.preprocess_input(images * 255.0)
        reference = self.vgg_convs[0](caffe)
        kernel, bias = vgg16_init.caffe_to_normalized_first_layer(*self.vgg_convs[0].get_weights())
        normalised = preprocessing.Normalize(
            preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD
        )(images)
        ours = tf.nn.relu(tf.nn.conv2d(normalised, kernel, 1, "SAME") + bias)
        # Exact away from the border, where both spaces see real pixels.
        self.assertAllClose(ours[:, 1:-1, 1:-1], reference[:, 1:-1, 1:-1], atol=1e-3, rtol=1e-4)

    def test_loads_from_weights_file(self):
        path = os.path.join(tempfile.mkdtemp(), "vgg16_notop.weights.h5")
        self.vgg.save_weights(path)
        model = ae_lib.build_autoencoder()
        copied = vgg16_init.init_encoder_from_vgg16(model, path, adapt_first_layer=False)
        self.assertLen(copied, 13)
        for conv, source in zip(ae_lib.encoder_conv_layers(model), self.vgg_convs, strict=True):
            self.assertAllEqual(conv.kernel, source.kernel)

    def test_errors(self):
        with self.assertRaisesRegex(FileNotFoundError, "missing.weights.h5"):
            vgg16_init.load_vgg16("/nonexistent/missing.weights.h5")
        narrow = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(stage_widths=((8,),)))
        with self.assertRaisesRegex(ValueError, "conv11 has kernel shape"):
            vgg16_init.init_encoder_from_vgg16(narrow, self.vgg)
        gray = ae_lib.build_autoencoder(ae_lib.AutoencoderConfig(num_stages=1, channels=1))
        with self.assertRaisesRegex(ValueError, "3-channel"):
            vgg16_init.init_encoder_from_vgg16(gray, self.vgg)


if __name__ == "__main__":
    tf.test.main()
