"""Input data: sources (`sources`) and batched, distributed pipelines (`input_pipeline`).

The package's public names are importable from here, so callers write
`from s2s_tf import data` and `data.DataConfig`, `data.make_dataset_fn(...)`.
"""

from s2s_tf.data.input_pipeline import load_numpy
from s2s_tf.data.input_pipeline import make_dataset_fn
from s2s_tf.data.input_pipeline import preprocess_eval
from s2s_tf.data.input_pipeline import preprocess_train
from s2s_tf.data.input_pipeline import release_in_background
from s2s_tf.data.sources import AUGMENTATIONS
from s2s_tf.data.sources import FASHION_MNIST_DIR
from s2s_tf.data.sources import SOURCES
from s2s_tf.data.sources import DataConfig
from s2s_tf.data.sources import list_image_folder
from s2s_tf.data.sources import load_fashion_mnist
from s2s_tf.data.sources import load_source
from s2s_tf.data.sources import read_idx

__all__ = [
    "AUGMENTATIONS",
    "FASHION_MNIST_DIR",
    "SOURCES",
    "DataConfig",
    "list_image_folder",
    "load_fashion_mnist",
    "load_numpy",
    "load_source",
    "make_dataset_fn",
    "preprocess_eval",
    "preprocess_train",
    "read_idx",
    "release_in_background",
]
