"""Parsing, augmentation and `dataset_fn`: raw source examples to batches in [0, 1].

`make_dataset_fn(config, training)` gives the `dataset_fn` of
`strategy.distribute_datasets_from_function`; `load_numpy` reads a small evaluation set;
`read_shards` streams a whole split in fixed-size shards, one in memory at a time;
`release_in_background` deletes finished iterators off the caller's thread.
"""

import dataclasses
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from s2s_tf.data.sources import DataConfig
from s2s_tf.data.sources import load_source

# Below this side length the CIFAR-style pad-and-crop is used; above it, Inception-style random
# resized crops, whose 8% minimum area would destroy tiny images.
_RESIZED_CROP_MIN_SIZE = 96


def _to_float_rgb(image: tf.Tensor) -> tf.Tensor:
    """Converts an image to float32 in [0, 1] with 3 channels (gray is tiled, alpha dropped)."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    channels = image.shape[-1]
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"Images need 1, 3 or 4 channels, got shape {image.shape}.")
    return image


def _resize(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    # Antialiasing only changes downscaling, where plain bilinear would alias.
    image = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)


def _center_crop(image: tf.Tensor, size: tuple[int, int], fraction: float) -> tf.Tensor:
    """Takes the largest central crop with the aspect ratio of `size`, scaled by `fraction`."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.minimum(shape[0] / size[0], shape[1] / size[1]) * fraction
    crop = tf.cast(tf.round(tf.constant(size, tf.float32) * scale), tf.int32)
    crop = tf.clip_by_value(crop, 1, tf.cast(shape, tf.int32))
    offset = (tf.cast(shape, tf.int32) - crop) // 2
    return tf.image.crop_to_bounding_box(image, offset[0], offset[1], crop[0], crop[1])


def preprocess_eval(image: tf.Tensor, size: tuple[int, int], fraction: float = 1.0) -> tf.Tensor:
    """Deterministic evaluation view: central crop then resize, float32 RGB in [0, 1]."""
    image = _to_float_rgb(image)
    image = _resize(_center_crop(image, size, fraction), size)
    return tf.ensure_shape(image, [*size, 3])


def preprocess_train(
    image: tf.Tensor, size: tuple[int, int], seed: tf.Tensor, flip: bool = True
) -> tf.Tensor:
    """Random training view: crop and (if `flip`) horizontal flip, reproducible from `seed`.

    Small outputs use pad-and-crop (padding an eighth of the side, reflected); larger ones use
    random resized crops of 8-100% of the area and aspect ratio 3/4-4/3.

    Args:
        image: One decoded image.
        size: Output `(height, width)`.
        seed: int64 `[2]` seed.
        flip: Whether to flip left-right with probability 1/2.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _to_float_rgb(image)
    if min(size) < _RESIZED_CROP_MIN_SIZE:
        image = _resize(image, size)
        pad_h, pad_w = max(1, size[0] // 8), max(1, size[1] // 8)
        image = tf.pad(image, [[pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="REFLECT")
        image = tf.image.stateless_random_crop(image, [*size, 3], seed=crop_seed)
    else:
        begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            tf.zeros([1, 0, 4]),
            seed=crop_seed,
            min_object_covered=0.0,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            use_image_if_no_bounding_boxes=True,
        )
        image = _resize(tf.slice(image, begin, crop), size)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return tf.ensure_shape(image, [*size, 3])


def _evaluation_view(config: DataConfig) -> Callable[[tf.Tensor, tf.Tensor], tuple]:
    """The evaluation pipelines' map: a raw example to (float32 [H, W, 3] in [0, 1], int32)."""

    def evaluate(image, label):
        return preprocess_eval(image, config.image_size, config.crop_fraction), tf.cast(
            label, tf.int32
        )

    return evaluate


def make_dataset_fn(
    config: DataConfig, training: bool, start_step: int = 0
) -> Callable[[tf.distribute.InputContext | None], tf.data.Dataset]:
    """Builds a `dataset_fn` for `strategy.distribute_datasets_from_function`.

    Training pipelines shuffle (seeded), repeat forever, augment as `config.augment` says and
    always drop the last partial batch (nothing is lost when repeating, and shapes stay
    static). Their stream is a function of the seed alone, so a run resumed at `start_step`
    reads what an uninterrupted run reads from that step on: the skipped examples are
    dropped before they are decoded or augmented. Evaluation pipelines read each example of
    their shard once, in order.

    Args:
        config: What to read and how to batch it.
        training: Whether to build the training pipeline.
        start_step: Training only: global batches already consumed, skipped.

    Returns:
        `dataset_fn(input_context)` yielding `(float32 [b, H, W, 3] in [0, 1], int32 [b])`
        batches, with b the per-replica batch size (the global one when `input_context` is
        None); each input pipeline reads a disjoint shard.
    """

    if not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")

    def dataset_fn(input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        num_shards, shard_id, batch_size = 1, 0, config.global_batch_size
        if input_context is not None:
            num_shards = input_context.num_input_pipelines
            shard_id = input_context.input_pipeline_id
            batch_size = input_context.get_per_replica_batch_size(config.global_batch_size)
        ds = load_source(config, num_shards, shard_id)
        if config.cache:
            ds = ds.cache()
        size = config.image_size
        if training:
            # Each pipeline gets its own stream of randomness so that shards are not augmented
            # in lockstep.
            ds = ds.shuffle(config.shuffle_buffer, seed=config.seed * 1009 + shard_id)
            # Each pipeline reads global_batch / pipelines examples per step.
            per_step = config.global_batch_size // num_shards
            ds = ds.repeat().enumerate().skip(start_step * per_step)
        if training and config.augment != "off":
            base_seed = tf.constant([config.seed, shard_id], tf.int64)
            flip = config.augment == "crop_flip"

            def augment(index, example):
                # One seed per element (from its position in the repeated stream), so results
                # do not depend on map parallelism and differ between epochs.
                seed = tf.random.experimental.stateless_fold_in(base_seed, index)
                image = preprocess_train(example[0], size, seed, flip)
                return image, tf.cast(example[1], tf.int32)

            ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        elif training:

            def plain(index, example):
                del index
                image = preprocess_eval(example[0], size, config.crop_fraction)
                return image, tf.cast(example[1], tf.int32)

            ds = ds.map(plain, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(_evaluation_view(config), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=training or config.drop_remainder)
        return ds.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def release_in_background(holder: list) -> threading.Thread:
    """Empties `holder` (a list of finished tf.data iterators) and deletes them on a thread.

    Deleting an iterator cancels its autotuning thread, and that cancellation can miss its
    wakeup: TensorFlow's `CancellationManager` marks itself cancelled only after running the
    callback that wakes the thread, so a thread woken in between goes back to sleep for the
    rest of its optimization period, which grows to 60 s. The delete then waits for it: on
    this project's 2-core CPU, 0-60 s per long-lived iterator, at random (seen at the end of
    training stages and of the streaming evaluation). The delete releases the GIL, so deleting
    on another thread lets the caller go on; the iterator's memory is freed when the thread
    ends.

    The thread is not a daemon: the interpreter's exit waits for it. A daemon thread still
    inside the delete when the process exits is stopped there, in TensorFlow's C++ code, and
    the process aborts after its work is done ("FATAL: exception not rethrown", exit status
    -6), at random.

    Args:
        holder: A list whose items are the only references to the iterators (pass the list,
            not the iterator: a reference left in the caller's frame would delete it there).

    Returns:
        The (started) thread that deletes them.
    """
    items = holder[:]
    holder.clear()
    thread = threading.Thread(target=items.clear, name="tf_data_iterator_release", daemon=False)
    thread.start()
    return thread


def load_numpy(config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Reads a (small) evaluation set into memory, e.g. for attacks or reports.

    Args:
        config: Data config; set `num_examples` to bound the size. Augmentation is never applied
            and every example of the split (or subset) is returned, in order.

    Returns:
        `(images float32 [N, H, W, 3] in [0, 1], labels int32 [N])`.
    """
    config = dataclasses.replace(config, drop_remainder=False)
    images, labels = [], []
    for x, y in make_dataset_fn(config, training=False)(None).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def count_examples(config: DataConfig) -> int:
    """How many examples the evaluation pipeline of `config` yields (bounded by `num_examples`).

    Raises:
        ValueError: If the split holds no example.
    """
    ds = load_source(config)
    count = int(ds.cardinality())
    if count < 0:  # unknown (a source that filters): count by reading it once
        count = int(ds.reduce(np.int64(0), lambda n, *_: n + 1))
    if count < 1:
        raise ValueError(f"The {config.source!r} split {config.split!r} holds no example.")
    return count


def read_shards(
    config: DataConfig, shard_size: int, wanted: Iterable[int] | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Streams the evaluation examples of `config` in shards of `shard_size`, in order.

    Shard `i` holds the examples `[i * shard_size, (i + 1) * shard_size)` of the split
    (the last one may be shorter), exactly as `load_numpy` returns them: the same source,
    preprocessing and order. Shards are read one after the other, with the next one
    prefetched, so memory holds a few shards whatever the size of the split.

    Args:
        config: Data config (its `num_examples` bounds the split; batching is ignored).
        shard_size: Examples per shard.
        wanted: Indices of the shards to return (default: all). The examples of other
            shards are not preprocessed, but sources that decode files (folders, TFDS)
            still read them; reading stops after the last wanted shard.

    Yields:
        `(shard index, images float32 [n, H, W, 3] in [0, 1], labels int32 [n])`.

    Raises:
        ValueError: If `shard_size` is not a positive int.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}.")
    ds = load_source(config).enumerate()
    if wanted is not None:
        keep = sorted({int(i) for i in wanted})
        if not keep:
            return
        ds = ds.take((keep[-1] + 1) * shard_size)
        keep_t = tf.constant(keep, tf.int64)
        ds = ds.filter(lambda i, _: tf.reduce_any(tf.equal(i // shard_size, keep_t)))
    view = _evaluation_view(config)
    ds = ds.map(lambda i, example: (i, *view(*example)), num_parallel_calls=tf.data.AUTOTUNE)
    # Every wanted shard but the split's last is full, so batches are exactly the shards.
    # The iterator lives as long as the evaluation: released off this thread at the end.
    iterators = [ds.batch(shard_size).prefetch(1).as_numpy_iterator()]
    try:
        for index, images, labels in iterators[0]:
            shard = int(index[0]) // shard_size
            if int(index[-1]) // shard_size != shard:
                raise AssertionError(f"shard {shard} mixes examples of other shards: {index}")
            yield shard, images, labels
    finally:
        release_in_background(iterators)
