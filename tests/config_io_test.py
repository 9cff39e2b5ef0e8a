"""Tests for writing and reading run configs."""

import dataclasses
import json
import os
import tempfile

import tensorflow as tf

from s2s_tf import config_io
from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.train import stages
from s2s_tf.train import train_lib


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

    def test_a_stage_config_with_optional_parts_round_trips(self):
        # eval_data is `DataConfig | None`: read back as a DataConfig, not a dict.
        data = data_lib.DataConfig(source="testing", image_size=(16, 16))
        config = train_lib.TrainConfig(
            stage="stage1",
            model=stages.ModelConfig(classifier="testing", image_size=(16, 16)),
            train_data=data,
            eval_data=dataclasses.replace(data, split="test", num_examples=8),
        )
        path = config_io.save_config(config, tempfile.mkdtemp())
        loaded = config_io.load_config(train_lib.TrainConfig, path)
        self.assertIsInstance(loaded.eval_data, data_lib.DataConfig)
        self.assertEqual(loaded, config)
        no_eval = dataclasses.replace(config, eval_data=None)
        path = config_io.save_config(no_eval, tempfile.mkdtemp())
        self.assertIsNone(config_io.load_config(train_lib.TrainConfig, path).eval_data)

    def test_unknown_field_is_named(self):
        with self.assertRaisesRegex(ValueError, "bogus"):
            config_io.config_from_dict(ae_lib.AutoencoderConfig, {"bogus": 1})


if __name__ == "__main__":
    tf.test.main()
