"""The files TF Serving reads beside the SavedModel: model config, batching, warm-up requests.

- `models.config`: a `ModelServerConfig` text proto naming the model, its base
  path as the server sees it and the version policy (serve the latest).
- `batching_parameters`: a `BatchingParameters` text proto for
  `--enable_batching` (that proto ships with the server, not with
  `tensorflow-serving-api`, so its few fields are written as text).
- `assets.extra/tf_serving_warmup_requests`: TFRecord of `PredictionLog`s, one
  Predict request per signature and warm-up batch size, which the server runs
  before it reports the version as available.

Text files are written under a temporary name and renamed into place.
"""

import os

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from s2s_tf.export import signatures

MODEL_CONFIG_FILE = "models.config"
BATCHING_FILE = "batching_parameters"
WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"


def _write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def model_server_config(model_name, base_path):
    """A `ModelServerConfig` serving the latest version under `base_path`."""
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = base_path
    model.model_platform = "tensorflow"
    model.model_version_policy.latest.num_versions = 1
    return config


def write_model_server_config(directory, model_name, base_path):
    """Writes `directory/models.config` and returns its path."""
    text = text_format.MessageToString(model_server_config(model_name, base_path))
    return _write_text(os.path.join(directory, MODEL_CONFIG_FILE), text)


def batching_parameters_text(max_batch_size, batch_timeout_micros, num_batch_threads):
    """The `BatchingParameters` text proto (each field is a wrapper message)."""
    fields = (
        ("max_batch_size", max_batch_size),
        ("batch_timeout_micros", batch_timeout_micros),
        ("max_enqueued_batches", 100),
        ("num_batch_threads", num_batch_threads),
    )
    return "".join(f"{name} {{ value: {value} }}\n" for name, value in fields)


def write_batching_parameters(directory, max_batch_size, batch_timeout_micros, num_batch_threads):
    """Writes `directory/batching_parameters` and returns its path."""
    text = batching_parameters_text(max_batch_size, batch_timeout_micros, num_batch_threads)
    return _write_text(os.path.join(directory, BATCHING_FILE), text)


def example_images(batch_size, image_size, seed=0):
    """A smooth random float32 batch [N, H, W, 3] in [0, 1] (warm-up and tests)."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    coarse = rng.uniform(size=(batch_size, 1 + h // 4, 1 + w // 4, 3)).astype(np.float32)
    return tf.image.resize(coarse, (h, w)).numpy().clip(0.0, 1.0)


def example_image_bytes(batch_size, image_size, seed=0):
    """Encoded images [N] (alternately PNG and JPEG) of `example_images`."""
    images = tf.image.convert_image_dtype(example_images(batch_size, image_size, seed), tf.uint8)
    encode = (tf.io.encode_png, tf.io.encode_jpeg)
    return np.array([encode[i % 2](image).numpy() for i, image in enumerate(images)], object)


def warmup_requests(model_name, image_size, batch_sizes):
    """One `PredictRequest` per signature and batch size.

    Args:
      model_name: the served model's name.
      image_size: (H, W).
      batch_sizes: batch sizes to warm up.

    Returns:
      A list of `predict_pb2.PredictRequest`.
    """
    requests = []
    for batch_size in batch_sizes:
        for name in signatures.SIGNATURE_NAMES:
            if name == signatures.BYTES_SIGNATURE:
                key, value = signatures.BYTES_INPUT, example_image_bytes(batch_size, image_size)
            else:
                key, value = signatures.IMAGES_INPUT, example_images(batch_size, image_size)
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=name)
            )
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            requests.append(request)
    return requests


def write_warmup_requests(saved_model_dir, requests):
    """Writes `requests` as PredictionLog records to `assets.extra/` of a SavedModel."""
    directory = os.path.join(saved_model_dir, WARMUP_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WARMUP_FILE)
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(path):
    """Parses a warm-up file back into `PredictRequest`s."""
    requests = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        requests.append(log.predict_log.request)
    return requests
