"""Tests for s2s_tf/constants.py: the workdir layout and the enums the flags read."""

import os

import tensorflow as tf

from s2s_tf import constants


class ConstantsTest(tf.test.TestCase):
    def test_workdir_layout(self):
        self.assertEqual(
            constants.classifier_path("w"), os.path.join("w", "stage0", "classifier.keras")
        )
        self.assertEqual(
            constants.autoencoder_path("w"), os.path.join("w", "stage1", "autoencoder.keras")
        )
        self.assertEqual(
            constants.autoencoder_path("w", "stage2"),
            os.path.join("w", "stage2", "autoencoder.keras"),
        )
        self.assertEqual(
            constants.defended_path("w"), os.path.join("w", "stage2", "defended.keras")
        )
        self.assertEqual(constants.eval_report_dir("w"), os.path.join("w", "eval_report"))
        self.assertEqual(constants.export_base("w"), os.path.join("w", "export"))

    def test_unknown_stage_is_named(self):
        with self.assertRaisesRegex(ValueError, "stage3"):
            constants.stage_dir("w", "stage3")

    def test_model_name_pattern(self):
        for good in ("s2s", "resnet50.v2", "a-b_c"):
            self.assertTrue(constants.MODEL_NAME_PATTERN.match(good), good)
        for bad in ("", ".hidden", "a/b", "../x", "a b"):
            self.assertFalse(constants.MODEL_NAME_PATTERN.match(bad), bad)


if __name__ == "__main__":
    tf.test.main()
