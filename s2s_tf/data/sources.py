"""Image sources: Fashion-MNIST idx files, image folders, TFDS and in-memory test data.

Every pipeline yields `(images, labels)` with images float32 `[B, H, W, 3]` in [0, 1] and labels
int32 `[B]`, whatever the source. Sources are plain functions registered in `SOURCES`:

* `"testing"`: a few deterministic random images made in memory, for tests.
* `"fashion_mnist"`: the idx `.gz` files of the Debian package `dataset-fashion-mnist`.
* `"folder"`: a directory of class subfolders holding jpg/png/bmp/gif images.
* `"tfds"` (or `"tfds:<name>"`): any TensorFlow Datasets dataset.

`load_source(config, num_shards, shard_id)` gives one shard of raw examples; the batching and
parsing are in `s2s_tf.data.input_pipeline`.
"""

import dataclasses
import functools
import gzip
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from s2s_tf import config_io
from s2s_tf.config_io import setting

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Training augmentations: none, random crops, random crops and horizontal flips.
AUGMENTATIONS = ("off", "crop", "crop_flip")
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# A fixed order seed (not `DataConfig.seed`), so that a `num_examples` subset of a folder is
# the same images for every run, whatever seed its training used.
_FOLDER_ORDER_SEED = 0
_IMAGENET_HINT = (
    " ImageNet cannot be downloaded: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a"
    " folder and pass it as manual_dir (now {!r})."
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    Attributes:
        source: A key of `SOURCES`, or `"tfds:<name>"`.
        split: Split name, e.g. "train" or "test"; TFDS also accepts slices such as "train[:10%]".
            For a folder, a subfolder of that name is used when it exists.
        image_size: Output `(height, width)`.
        global_batch_size: Batch size summed over all replicas.
        shuffle_buffer: Shuffle buffer size for training pipelines (1 keeps the order).
        seed: Seed of shuffling and augmentation.
        augment: What training pipelines do to each image: "off", "crop" (random crops) or
            "crop_flip" (random crops and horizontal flips). Flips change the meaning of digits
            and text. `True` and `False` (configs written before the setting had modes) read
            as "crop_flip" and "off".
        data_dir: Fashion-MNIST idx directory, or the TFDS `data_dir`.
        folder: Root of the image folder for the `"folder"` source.
        cache: Whether to cache decoded examples in memory (only for data that fits).
        drop_remainder: Whether evaluation pipelines drop a last partial batch.
        num_examples: If set, only the first `num_examples` examples of the split are used.
        tfds_name: TFDS dataset name for the `"tfds"` source.
        manual_dir: TFDS manual download directory (e.g. for imagenet2012).
        download: Whether TFDS may download and prepare data that is missing.
        crop_fraction: Fraction of the central region kept by evaluation before resizing.
    """

    source: str = setting(
        "fashion_mnist",
        "Data source: a key of SOURCES (testing, fashion_mnist, folder, tfds), or tfds:<name> "
        "for any TensorFlow Datasets dataset.",
        flag="dataset",
        check=lambda v: _check_source(v),
    )
    split: str = "train"
    image_size: tuple[int, int] = setting(
        (32, 32),
        "Image size 'S' or 'H,W' the models work at.",
        parse=config_io.parse_image_size,
        unparse=config_io.unparse_image_size,
    )
    global_batch_size: int = setting(
        64, "Global batch size (over all replicas).", flag="batch_size", lower_bound=1
    )
    shuffle_buffer: int = 10_000
    seed: int = setting(0, "Random seed for shuffling, augmentation, init and attacks.")
    augment: str = setting(
        "crop_flip",
        "Training augmentation: off, crop (random crops) or crop_flip (random crops and "
        "horizontal flips; flips change the meaning of digits and text).",
        choices=AUGMENTATIONS,
    )
    data_dir: str | None = setting(None, "Fashion-MNIST idx directory, or the TFDS data_dir.")
    folder: str | None = setting(
        None, "Root of a folder of class subfolders of images.", flag="image_folder"
    )
    cache: bool = False
    drop_remainder: bool = False
    num_examples: int | None = None
    tfds_name: str | None = None
    manual_dir: str | None = setting(None, "TFDS manual download dir (e.g. imagenet2012).")
    download: bool = True
    crop_fraction: float = 1.0

    def __post_init__(self):
        # Configs come back from JSON with lists; keep the field hashable and comparable.
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if isinstance(self.augment, bool):  # the setting's form before it had modes
            object.__setattr__(self, "augment", "crop_flip" if self.augment else "off")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}.")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be two positive ints, got {self.image_size}.")
        if self.global_batch_size < 1 or self.shuffle_buffer < 1:
            raise ValueError("global_batch_size and shuffle_buffer must be positive.")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"num_examples must be positive, got {self.num_examples}.")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}.")


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Reads an unsigned-byte idx file (optionally gzipped), as used by (Fashion-)MNIST.

    Args:
        path: File path; names ending in `.gz` are decompressed.
        expected_magic: 2051 for image files (3 dims) or 2049 for label files (1 dim).

    Returns:
        A read-only uint8 array of the dims stored in the header.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is not a valid idx file with that magic number.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: not a valid gzip file ({e}).") from e
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: bad idx magic number {magic}, expected {expected_magic}.")
    ndim = magic & 0xFF  # Low byte is the rank; the byte above it is the type (0x08 = uint8).
    header = 4 + 4 * ndim  # A short header parses as zero dims and fails the size check.
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(
            f"{path}: dims {dims} need {int(np.prod(dims))} bytes of data, found "
            f"{len(data) - header}."
        )
    # frombuffer over bytes is read-only, so callers cannot corrupt the cached arrays below.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(split: str = "train", directory: str | None = None):
    """Loads a Fashion-MNIST split from the idx files of `dataset-fashion-mnist`.

    Args:
        split: "train" (60000 examples) or "test" (10000 examples).
        directory: Folder of the `.gz` idx files; defaults to `FASHION_MNIST_DIR`.

    Returns:
        `(images, labels)`: read-only uint8 arrays `[N, 28, 28]` and `[N]`.

    Raises:
        FileNotFoundError: If a file is missing, with the command that installs it.
        ValueError: If the split is unknown or a file is malformed.
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST has splits {sorted(_FASHION_MNIST_FILES)}, got {split!r}.")
    directory = directory or FASHION_MNIST_DIR
    prefix = os.path.join(directory, _FASHION_MNIST_FILES[split])
    paths = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} is missing. Install it with `apt-get install "
                "dataset-fashion-mnist`, or pass the folder holding the idx files as data_dir."
            )
    images = read_idx(paths[0], _IDX_IMAGES_MAGIC)
    labels = read_idx(paths[1], _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{paths[0]} has {images.shape[0]} images but {paths[1]} has {labels.shape[0]} labels."
        )
    return images, labels


# A source maps (config, num_shards, shard_id) to this shard's unbatched (uint8 image [H, W, C],
# integer label) examples. Sharding happens inside the source so that each can shard cheaply
# (file lists before reading, TFDS by split slices) instead of reading everything and dropping.

SourceFn = Callable[[DataConfig, int, int], tf.data.Dataset]


def _from_arrays(config: DataConfig, images, labels, num_shards: int, shard_id: int):
    """Subsets, shards and wraps in-memory arrays; images get a channel axis if they lack one."""
    if images.ndim == 3:
        images = images[..., np.newaxis]
    stop = config.num_examples
    images = images[:stop][shard_id::num_shards]
    labels = labels[:stop][shard_id::num_shards]
    return tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))


def _testing_source(config: DataConfig, num_shards: int, shard_id: int) -> tf.data.Dataset:
    """64 random 32x32 RGB images of 10 classes, deterministic per split."""
    rng = np.random.default_rng(sum(config.split.encode()))
    images = rng.integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(64,))
    return _from_arrays(config, images, labels, num_shards, shard_id)


def _fashion_mnist_source(config: DataConfig, num_shards: int, shard_id: int) -> tf.data.Dataset:
    images, labels = load_fashion_mnist(config.split, config.data_dir)
    return _from_arrays(config, images, labels, num_shards, shard_id)


def list_image_folder(folder: str) -> tuple[list[str], list[int], list[str]]:
    """Lists the images of a folder of class subfolders.

    Args:
        folder: Root folder; each subfolder is a class (index = position in sorted names) and
            holds images (searched recursively) ending in .jpg/.jpeg/.png/.bmp/.gif.

    Returns:
        `(paths, labels, class_names)`, paths in a fixed pseudo-random order so that classes mix
        in any prefix and shard.

    Raises:
        FileNotFoundError: If `folder` does not exist.
        ValueError: If it holds no class subfolder with images.
    """
    hint = "It needs one subfolder per class, each holding .jpg/.png/.bmp/.gif images."
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"Image folder {folder!r} does not exist. {hint}")
    class_names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for root, _, files in sorted(os.walk(os.path.join(folder, name))):
            for file in sorted(files):
                if file.lower().endswith(_IMAGE_EXTENSIONS):
                    paths.append(os.path.join(root, file))
                    labels.append(label)
    if not paths:
        raise ValueError(f"No images found in class subfolders of {folder}. {hint}")
    order = np.random.default_rng(_FOLDER_ORDER_SEED).permutation(len(paths))
    return [paths[i] for i in order], [labels[i] for i in order], class_names


def _decode_file(path: tf.Tensor, label: tf.Tensor):
    # channels=3 replicates grayscale and drops alpha; expand_animations=False keeps a GIF's
    # first frame, so every file decodes to one [H, W, 3] image.
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return image, label


def _folder_source(config: DataConfig, num_shards: int, shard_id: int) -> tf.data.Dataset:
    folder = config.folder
    if folder and os.path.isdir(os.path.join(folder, config.split)):
        folder = os.path.join(folder, config.split)
    paths, labels, _ = list_image_folder(folder)
    stop = config.num_examples
    paths = paths[:stop][shard_id::num_shards]
    labels = np.asarray(labels[:stop][shard_id::num_shards], np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    return ds.map(_decode_file, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_source(config: DataConfig, num_shards: int, shard_id: int) -> tf.data.Dataset:
    # Imported here: tensorflow_datasets takes seconds to import and only this source needs it.
    import tensorflow_datasets as tfds

    name = config.tfds_name
    if not name:
        raise ValueError('The "tfds" source needs tfds_name (or use source="tfds:<name>").')
    split = config.split
    if config.num_examples is not None:
        split = f"{split}[:{config.num_examples}]"
    if num_shards > 1:
        split = tfds.even_splits(split, n=num_shards)[shard_id]
    kwargs = {}
    if config.manual_dir:
        kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=config.manual_dir)
    try:
        return tfds.load(
            name,
            split=split,
            data_dir=config.data_dir,
            as_supervised=True,
            shuffle_files=False,
            download=config.download,
            download_and_prepare_kwargs=kwargs,
        )
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"TFDS has no dataset named {name!r}.") from e
    except (AssertionError, OSError, ImportError, tf.errors.OpError) as e:
        # TFDS reports missing data as AssertionError and failed downloads in many ways; name
        # what was looked for and where, so the fix is obvious.
        manual = _IMAGENET_HINT.format(config.manual_dir) if name.startswith("imagenet2012") else ""
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) could not be loaded from data_dir "
            f"{config.data_dir or '~/tensorflow_datasets'!r} with download={config.download}."
            f"{manual} Prepare it with `tfds build {name}` or set data_dir. Cause: "
            f"{type(e).__name__}: {e}"
        ) from e


SOURCES: dict[str, SourceFn] = {
    "testing": _testing_source,
    "fashion_mnist": _fashion_mnist_source,
    "folder": _folder_source,
    "tfds": _tfds_source,
}


def _check_source(name):
    """Raises ValueError unless `name` is a key of `SOURCES` or "tfds:<name>"."""
    if name not in SOURCES and not (name.startswith("tfds:") and len(name) > len("tfds:")):
        raise ValueError(f"--dataset must be one of {sorted(SOURCES)} or tfds:<name>, got {name!r}")


def load_source(config: DataConfig, num_shards: int = 1, shard_id: int = 0) -> tf.data.Dataset:
    """Returns one shard of the raw `(uint8 image [H, W, C], int label)` examples of a config.

    Args:
        config: Data config; `source` is a key of `SOURCES` or `"tfds:<name>"`.
        num_shards: Number of input pipelines.
        shard_id: Index of this pipeline in `[0, num_shards)`.

    Returns:
        An unbatched dataset, in a fixed order.

    Raises:
        ValueError: If the source is unknown.
    """
    if config.source.startswith("tfds:"):
        config = dataclasses.replace(config, source="tfds", tfds_name=config.source[len("tfds:") :])
    if config.source not in SOURCES:
        raise ValueError(
            f"Unknown source {config.source!r}; known: {sorted(SOURCES)}, tfds:<name>."
        )
    return SOURCES[config.source](config, num_shards, shard_id)
