"""Tests for writing and reading run configs."""

import dataclasses
import json
import os
import tempfile

import tensorflow as tf

from s2s_tf import config_io
from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib


@dataclasses.dataclass(frozen=True)
class _RunConfig:
    data: data_lib.DataConfig
    autoencoder: ae_lib.AutoencoderConfig
    steps: int = 3


class ConfigIoTest(tf.test.TestCase):
    def test_nested_config_round_trips(self):
        config = _RunConfig(
            data=data_lib.DataConfig(source="testing", image_size=(16, 24)),
            autoencoder=ae_lib.AutoencoderConfig(stage_widths=((4, 4), (8,)), num_stages=1),
        )
        directory = tempfile.mkdtemp()
        path = config_io.save_config(config, directory)
        self.assertEqual(path, os.path.join(directory, "config.json"))
        self.assertFalse(os.path.exists(path + ".tmp"))
        with open(path) as f:
            self.assertEqual(json.load(f)["autoencoder"]["stage_widths"], [[4, 4], [8]])
        self.assertEqual(config_io.load_config(_RunConfig, path), config)

    def test_unknown_field_is_named(self):
        with self.assertRaisesRegex(ValueError, "bogus"):
            config_io.config_from_dict(ae_lib.AutoencoderConfig, {"bogus": 1})


if __name__ == "__main__":
    tf.test.main()
