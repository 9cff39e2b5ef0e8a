"""Tests of models.config, batching_parameters and the warm-up records."""

import os
import re
import tempfile

import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from s2s_tf.export import serving_files
from s2s_tf.export import signatures


class ServingFilesTest(tf.test.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = tempfile.mkdtemp(dir=self.get_temp_dir())

    def test_model_server_config_parses(self):
        path = serving_files.write_model_server_config(self.dir, "s2s", "/models/s2s")
        self.assertEqual(os.path.basename(path), serving_files.MODEL_CONFIG_FILE)
        with open(path, encoding="utf-8") as f:
            config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
        (model,) = config.model_config_list.config
        self.assertEqual((model.name, model.base_path), ("s2s", "/models/s2s"))
        self.assertEqual(model.model_platform, "tensorflow")
        self.assertEqual(model.model_version_policy.latest.num_versions, 1)
        self.assertEqual(sorted(os.listdir(self.dir)), [serving_files.MODEL_CONFIG_FILE])

    def test_batching_parameters(self):
        path = serving_files.write_batching_parameters(self.dir, 32, 1000, 4)
        with open(path, encoding="utf-8") as f:
            fields = dict(re.findall(r"^(\w+) \{ value: (\d+) \}$", f.read(), re.M))
        self.assertEqual(fields["max_batch_size"], "32")
        self.assertEqual(fields["batch_timeout_micros"], "1000")
        self.assertEqual(fields["num_batch_threads"], "4")
        self.assertIn("max_enqueued_batches", fields)

    def test_warmup_records_round_trip(self):
        requests = serving_files.warmup_requests("s2s", (8, 12), batch_sizes=(1, 3))
        path = serving_files.write_warmup_requests(self.dir, requests)
        self.assertEqual(path, os.path.join(self.dir, "assets.extra", "tf_serving_warmup_requests"))
        parsed = serving_files.read_warmup_requests(path)
        self.assertLen(parsed, 2 * len(signatures.SIGNATURE_NAMES))
        self.assertEqual(parsed, requests)
        for request in parsed:
            self.assertEqual(request.model_spec.name, "s2s")
            (key,) = request.inputs
            value = tf.make_ndarray(request.inputs[key])
            if request.model_spec.signature_name == signatures.BYTES_SIGNATURE:
                self.assertEqual(key, signatures.BYTES_INPUT)
                self.assertIn(value.shape, ((1,), (3,)))
            else:
                self.assertEqual(key, signatures.IMAGES_INPUT)
                self.assertIn(value.shape, ((1, 8, 12, 3), (3, 8, 12, 3)))
                self.assertBetween(float(value.min()), 0.0, 1.0)
                self.assertBetween(float(value.max()), 0.0, 1.0)


if __name__ == "__main__":
    tf.test.main()
