"""Tests for s2s_tf.data: idx parsing, sources, sharding and augmentation."""

import dataclasses
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from xml.etree import ElementTree

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

from s2s_tf import data

_APT_HINT = "apt-get install dataset-fashion-mnist"
_MISSING = f"Fashion-MNIST ({data.FASHION_MNIST_DIR}) is missing; install it with `{_APT_HINT}`."
CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")
# Three skips, run under tests/conftest.py by `CiSkipPolicyTest`.
_SKIPPING_TESTS = """
import unittest


class Skips(unittest.TestCase):
    def test_data_skip(self):
        self.skipTest({data!r})

    def test_stages_skip(self):
        self.skipTest({stages!r})

    @unittest.skip("PyTorch is not installed (pip install torch); skipped.")
    def test_torch_skip(self):
        pass
"""


def _skip_without_fashion_mnist(test):
    if not os.path.isdir(data.FASHION_MNIST_DIR):
        test.skipTest(_MISSING)


def _write_idx(path, magic, dims, payload):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def _write_image_folder(root):
    """Two classes: class "a" images are dark (value 20), class "b" bright (230)."""
    specs = {
        "a": [("0.png", (20, 30, 3), "png"), ("1.jpg", (40, 40, 3), "jpeg")],
        "b": [("0.png", (12, 10, 1), "png"), ("1.jpeg", (33, 17, 3), "jpeg"), ("n.txt", None, "")],
    }
    for label, (name, files) in enumerate(sorted(specs.items())):
        os.makedirs(os.path.join(root, name))
        for file, shape, kind in files:
            path = os.path.join(root, name, file)
            if shape is None:
                tf.io.write_file(path, "not an image")
                continue
            image = tf.fill(shape, tf.constant(20 + 210 * label, tf.uint8))
            encoded = tf.io.encode_png(image) if kind == "png" else tf.io.encode_jpeg(image)
            tf.io.write_file(path, encoded)


def _all_images(dataset):
    return np.concatenate([x for x, _ in dataset.as_numpy_iterator()])


class FashionMnistTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(("train", 60000), ("test", 10000))
    def test_real_idx_files(self, split, count):
        _skip_without_fashion_mnist(self)
        images, labels = data.load_fashion_mnist(split)
        self.assertEqual(images.shape, (count, 28, 28))
        self.assertEqual(images.dtype, np.uint8)
        self.assertEqual(labels.shape, (count,))
        # Fashion-MNIST is exactly balanced; a parsing offset or wrong file would break this.
        self.assertAllEqual(np.bincount(labels, minlength=10), [count // 10] * 10)
        self.assertGreater(images.max(), 200)

    @parameterized.named_parameters(
        ("bad_magic", 2050, (2, 2, 2), 8, 2049, "magic"),
        ("truncated", 2051, (2, 2, 2), 7, 2049, "bytes"),
        ("count_mismatch", 2051, (2, 2, 2), 8, 2049, "labels"),
    )
    def test_malformed_idx_raises_naming_file(self, magic, dims, nbytes, label_magic, message):
        folder = self.get_temp_dir()
        images_path = os.path.join(folder, "train-images-idx3-ubyte.gz")
        _write_idx(images_path, magic, dims, bytes(nbytes))
        n_labels = 3 if message == "labels" else 2
        labels_path = os.path.join(folder, "train-labels-idx1-ubyte.gz")
        _write_idx(labels_path, label_magic, (n_labels,), bytes(n_labels))
        data.load_fashion_mnist.cache_clear()
        with self.assertRaisesRegex(ValueError, f"train-images-idx3-ubyte.gz.*{message}"):
            data.load_fashion_mnist("train", folder)

    def test_missing_directory_names_path_and_package(self):
        missing = os.path.join(self.get_temp_dir(), "nowhere")
        with self.assertRaisesRegex(FileNotFoundError, f"{missing}/t10k.*{_APT_HINT}"):
            data.load_fashion_mnist("test", missing)
        config = data.DataConfig(source="fashion_mnist", data_dir=missing)
        with self.assertRaisesRegex(FileNotFoundError, _APT_HINT):
            data.make_dataset_fn(config, training=False)(None)

    def test_pipeline_matches_raw_pixels(self):
        _skip_without_fashion_mnist(self)
        config = data.DataConfig(split="test", image_size=(28, 28), num_examples=5)
        images, labels = data.load_numpy(config)
        raw_images, raw_labels = data.load_fashion_mnist("test")
        self.assertAllClose(images[..., 1], raw_images[:5] / 255.0)
        self.assertAllEqual(labels, raw_labels[:5])


class FolderTest(tf.test.TestCase):
    def test_loads_labels_shapes_and_range(self):
        root = os.path.join(self.get_temp_dir(), "images")
        _write_image_folder(root)
        paths, _, class_names = data.list_image_folder(root)
        self.assertEqual(class_names, ["a", "b"])
        self.assertLen(paths, 4)
        config = data.DataConfig(source="folder", folder=root, image_size=(16, 16))
        images, labels = data.load_numpy(config)
        self.assertEqual(images.shape, (4, 16, 16, 3))
        self.assertEqual(labels.dtype, np.int32)
        self.assertAllEqual(np.sort(labels), [0, 0, 1, 1])
        self.assertAllInRange(images, 0.0, 1.0)
        # Each image carries its class in its brightness, so labels must follow the folders.
        self.assertAllClose(images.mean(axis=(1, 2, 3)), (20 + 210 * labels) / 255.0, atol=0.02)

    def test_missing_or_empty_folder_explains_layout(self):
        missing = os.path.join(self.get_temp_dir(), "absent")
        with self.assertRaisesRegex(FileNotFoundError, f"{missing}.*subfolder per class"):
            data.list_image_folder(missing)
        empty = tempfile.mkdtemp(dir=self.get_temp_dir())
        with self.assertRaisesRegex(ValueError, f"No images found in class subfolders of {empty}"):
            data.list_image_folder(empty)


class TfdsTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters({"source": "tfds:mnist"}, {"source": "tfds", "tfds_name": "cifar10"})
    def test_mock_dataset_gives_rgb_float_batches(self, **kwargs):
        config = data.DataConfig(split="train", image_size=(24, 24), global_batch_size=4, **kwargs)
        with tfds.testing.mock_data(num_examples=6):
            for training in (True, False):
                images, labels = next(iter(data.make_dataset_fn(config, training)(None)))
                self.assertEqual(images.shape, (4, 24, 24, 3))
                self.assertEqual(images.dtype, tf.float32)
                self.assertEqual(labels.dtype, tf.int32)
                self.assertAllInRange(images, 0.0, 1.0)

    @parameterized.parameters("mnist", "imagenet2012")
    def test_missing_data_names_dataset_and_data_dir(self, name):
        data_dir = tempfile.mkdtemp(dir=self.get_temp_dir())
        config = data.DataConfig(source=f"tfds:{name}", data_dir=data_dir, download=False)
        expected = f"{name}.*{data_dir}"
        if name == "imagenet2012":
            expected += ".*manual_dir"
        with self.assertRaisesRegex(FileNotFoundError, expected):
            data.load_source(config)


class PipelineTest(tf.test.TestCase, parameterized.TestCase):
    def _batches(self, config, training, context=None, num_batches=1):
        ds = data.make_dataset_fn(config, training)(context)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(num_batches)]

    def test_shards_are_disjoint_and_cover_the_split(self):
        config = data.DataConfig(source="testing", global_batch_size=8)
        full = _all_images(data.make_dataset_fn(config, training=False)(None))
        shards = []
        for shard_id in range(2):
            context = tf.distribute.InputContext(2, shard_id, 2)
            ds = data.make_dataset_fn(config, training=False)(context)
            self.assertEqual(next(iter(ds))[0].shape[0], 4)
            shards.append({x.tobytes() for x in _all_images(ds)})
        self.assertEmpty(shards[0] & shards[1])
        self.assertEqual(shards[0] | shards[1], {x.tobytes() for x in full})
        self.assertLen(full, 64)

    @parameterized.parameters((32, 32), (96, 112))
    def test_augmentation_changes_images_reproducibly(self, height, width):
        # A one-element shuffle buffer keeps the order, so train and eval views line up.
        config = data.DataConfig(
            source="testing", image_size=(height, width), global_batch_size=16, shuffle_buffer=1
        )
        ((eval_x, eval_y),) = self._batches(config, training=False)
        ((train_x, train_y),) = self._batches(config, training=True)
        self.assertAllEqual(train_y, eval_y)
        self.assertEqual(train_x.shape, (16, height, width, 3))
        self.assertAllInRange(train_x, 0.0, 1.0)
        self.assertGreater(np.abs(train_x - eval_x).mean(), 0.01)
        self.assertAllEqual(self._batches(config, training=False)[0][0], eval_x)
        self.assertAllEqual(self._batches(config, training=True)[0][0], train_x)
        other_seed = dataclasses.replace(config, seed=1)
        self.assertNotAllClose(self._batches(other_seed, training=True)[0][0], train_x)
        no_augment = dataclasses.replace(config, augment=False)
        self.assertAllEqual(self._batches(no_augment, training=True)[0][0], eval_x)

    def test_augmentation_modes(self):
        config = data.DataConfig(
            source="testing", image_size=(16, 16), global_batch_size=32, shuffle_buffer=1
        )
        ((eval_x, _),) = self._batches(config, training=False)
        views = {
            mode: self._batches(dataclasses.replace(config, augment=mode), training=True)[0][0]
            for mode in data.AUGMENTATIONS
        }
        self.assertAllEqual(views["off"], eval_x)
        self.assertGreater(np.abs(views["crop"] - eval_x).mean(), 0.01)
        # The same seed draws the same crop; crop_flip then mirrors about half of them.
        flipped = []
        for crop, crop_flip in zip(views["crop"], views["crop_flip"], strict=True):
            mirrored = np.array_equal(crop_flip, crop[:, ::-1])
            self.assertTrue(mirrored or np.array_equal(crop_flip, crop))
            flipped.append(mirrored and not np.array_equal(crop, crop[:, ::-1]))
        self.assertBetween(sum(flipped), 4, 28)

    def test_augment_setting_values(self):
        self.assertEqual(data.DataConfig(augment=False).augment, "off")
        self.assertEqual(data.DataConfig(augment=True).augment, "crop_flip")
        self.assertEqual(data.DataConfig().augment, "crop_flip")
        with self.assertRaisesRegex(ValueError, "augment must be one of"):
            data.DataConfig(augment="flip")

    @parameterized.parameters(1, 2)
    def test_start_step_continues_the_stream(self, pipelines):
        config = data.DataConfig(
            source="testing", image_size=(16, 16), global_batch_size=8, shuffle_buffer=16
        )
        context = tf.distribute.InputContext(pipelines, 0, pipelines)
        whole = data.make_dataset_fn(config, training=True)(context)
        expected = [x.numpy() for x, _ in whole.take(7)][3:]
        resumed = data.make_dataset_fn(config, training=True, start_step=3)(context)
        for want, (got, _) in zip(expected, resumed.take(4), strict=True):
            self.assertAllEqual(got, want)
        with self.assertRaisesRegex(ValueError, "start_step"):
            data.make_dataset_fn(config, training=True, start_step=-1)

    def test_training_repeats_and_shuffles_with_seed(self):
        config = data.DataConfig(source="testing", global_batch_size=48, augment=False)
        first = self._batches(config, training=True, num_batches=3)
        again = self._batches(config, training=True, num_batches=3)
        for (x1, y1), (x2, y2) in zip(first, again, strict=True):
            self.assertAllEqual(x1, x2)
            self.assertAllEqual(y1, y2)
        ((eval_x, _),) = self._batches(config, training=False)
        self.assertNotAllClose(first[0][0], eval_x)

    def test_distribute_datasets_from_function(self):
        strategy = tf.distribute.get_strategy()
        config = data.DataConfig(source="testing", global_batch_size=8, num_examples=20)
        ds = strategy.distribute_datasets_from_function(data.make_dataset_fn(config, False))
        sizes = [int(strategy.experimental_local_results(y)[0].shape[0]) for _, y in ds]
        self.assertEqual(sizes, [8, 8, 4])

    def test_config_validation_and_json_round_trip(self):
        config = data.DataConfig(image_size=[8, 9])
        self.assertEqual(config.image_size, (8, 9))
        self.assertEqual(data.DataConfig(**dataclasses.asdict(config)), config)
        with self.assertRaises(ValueError):
            data.DataConfig(image_size=(0, 8))
        with self.assertRaisesRegex(ValueError, "Unknown source"):
            data.load_source(data.DataConfig(source="nope"))


class _Deletion:
    """Records the thread that deletes it; its deletion waits for `go` (at most 30 s)."""

    def __init__(self, go, deleted_on):
        self.go, self.deleted_on = go, deleted_on

    def __del__(self):
        self.deleted_on.append(threading.get_ident())
        self.go.wait(30)


class ReleaseInBackgroundTest(tf.test.TestCase):
    def test_deletes_off_the_callers_thread_without_blocking_it(self):
        go, deleted_on = threading.Event(), []
        holder = [_Deletion(go, deleted_on)]
        thread = data.release_in_background(holder)
        # The deletion is still waiting for `go`: the caller got here without waiting for it.
        self.assertEqual(holder, [])
        go.set()
        thread.join(30)
        self.assertFalse(thread.is_alive())
        self.assertLen(deleted_on, 1)
        self.assertNotEqual(deleted_on[0], threading.get_ident())
        self.assertEqual(deleted_on[0], thread.ident)

    def test_the_process_exit_waits_for_the_release(self):
        # A release still running at exit must finish, not be stopped mid-delete (inside
        # TensorFlow's C++ code that stop aborts the process after its work is done).
        marker = os.path.join(tempfile.mkdtemp(), "deleted")
        program = f"""
import time
from s2s_tf.data import input_pipeline

class Slow:
    def __del__(self):
        time.sleep(2)
        open({marker!r}, "w").close()

input_pipeline.release_in_background([Slow()])
"""
        result = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(os.path.exists(marker), "the exit stopped the release before it ended")

    def test_releases_a_tf_data_iterator(self):
        iterator = iter(tf.data.Dataset.range(10).map(lambda x: x + 1).prefetch(2))
        self.assertEqual(int(next(iterator)), 1)
        gone = weakref.ref(iterator)
        holder = [iterator]
        del iterator
        data.release_in_background(holder).join(30)
        self.assertIsNone(gone())


class RegistryTest(tf.test.TestCase, parameterized.TestCase):
    def test_every_entry_is_covered(self):
        self.assertEqual(set(data.SOURCES), {"testing", "fashion_mnist", "folder", "tfds"})

    @parameterized.parameters(sorted(data.SOURCES))
    def test_entry_builds(self, name):
        config = data.DataConfig(
            source=name, split="test", image_size=(16, 16), global_batch_size=2
        )
        if name == "fashion_mnist":
            _skip_without_fashion_mnist(self)
        elif name == "folder":
            root = os.path.join(self.get_temp_dir(), "registry_images")
            _write_image_folder(root)
            config = dataclasses.replace(config, folder=root)
        elif name == "tfds":
            config = dataclasses.replace(config, tfds_name="mnist")
            self.enter_context(tfds.testing.mock_data(num_examples=4))
        for training in (True, False):
            images, labels = next(iter(data.make_dataset_fn(config, training)(None)))
            self.assertEqual(images.shape, (2, 16, 16, 3))
            self.assertEqual(labels.shape, (2,))


class CiSkipPolicyTest(tf.test.TestCase):
    """tests/conftest.py: with CI=true a Fashion-MNIST skip fails the run; others stay skips."""

    def _outcomes(self, ci):
        root = tempfile.mkdtemp(dir=self.get_temp_dir())
        shutil.copy(CONFTEST, os.path.join(root, "conftest.py"))
        stages_reason = (  # as tests/stages_test.py words it
            "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz missing: "
            "apt-get install dataset-fashion-mnist"
        )
        with open(os.path.join(root, "test_skips.py"), "w", encoding="utf-8") as f:
            f.write(_SKIPPING_TESTS.format(data=_MISSING, stages=stages_reason))
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
        if ci is not None:
            env["CI"] = ci
        xml = os.path.join(root, "report.xml")
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={xml}", root],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.assertTrue(os.path.exists(xml), result.stdout + result.stderr)
        outcomes = {}
        for case in ElementTree.parse(xml).iter("testcase"):
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            outcomes[case.get("name")] = kinds[0] if kinds else "passed"
        return outcomes

    def test_fashion_mnist_skips_fail_in_ci_only(self):
        self.assertEqual(
            self._outcomes(ci="true"),
            {
                "test_data_skip": "failure",
                "test_stages_skip": "failure",
                "test_torch_skip": "skipped",
            },
        )
        for ci in (None, "false"):
            self.assertEqual(set(self._outcomes(ci).values()), {"skipped"}, ci)


if __name__ == "__main__":
    tf.test.main()
