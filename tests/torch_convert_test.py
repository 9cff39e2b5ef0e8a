"""Tests for the converter of the authors' PyTorch SegNet checkpoints.

The committed fixture (tests/testdata, made by make_segnet_fixture.py with
PyTorch) holds a reduced-width SegNet state dict under the authors' key names
and the PyTorch model's outputs and pooling indices on images with all-zero
pooling windows. Without PyTorch the converted Keras model must reproduce
them; with PyTorch a full-size model also goes through the `.pth` path.
"""

import importlib.util
import json
import os
import pickle
import sys
import unittest
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import checkpoint_files
from s2s_tf.models import classifiers
from s2s_tf.models import preprocessing
from s2s_tf.models import s2s_model
from s2s_tf.models import torch_convert

try:
    import torch
except ImportError:
    torch = None

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")
STATE_PATH = os.path.join(TESTDATA, "segnet_fixture_state.npz")
REFERENCE_PATH = os.path.join(TESTDATA, "segnet_fixture_reference.npz")
FIXTURE_SCRIPT = os.path.join(TESTDATA, "make_segnet_fixture.py")
TOLERANCE = 1e-5
NO_TORCH = (
    "PyTorch is not installed (pip install torch): the .pth path and the full-size "
    "comparison with a PyTorch SegNet did not run"
)


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def torch_to_tf_indices(indices):
    """PyTorch's per-plane indices h * W + w [N, C, h, w] -> TF's flat ones [N, h, w, C]."""
    n, c, h, w = indices.shape
    height, width = 2 * h, 2 * w
    row, col = indices.astype(np.int64) // width, indices.astype(np.int64) % width
    batch = np.arange(n).reshape(n, 1, 1, 1)
    channel = np.arange(c).reshape(1, c, 1, 1)
    return nhwc(((batch * height + row) * width + col) * c + channel)


def write_safetensors(path, tensors, bf16=()):
    """Writes a .safetensors file (the format's layout, no package needed); `bf16` names go BF16."""
    names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64"}
    header, chunks, offset = {}, [], 0
    for name, value in tensors.items():
        array = np.asarray(value, order="C")
        if name in bf16:  # bfloat16 = the upper half of a float32
            data, dtype = (array.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes(), "BF16"
        else:
            data, dtype = array.tobytes(), names[array.dtype]
        header[name] = {"dtype": dtype, "shape": list(array.shape)}
        header[name]["data_offsets"] = [offset, offset + len(data)]
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(np.array(len(text), "<u8").tobytes() + text + b"".join(chunks))


def raw_fixture():
    with np.load(STATE_PATH) as data:
        return {k: data[k] for k in data.files}


class FixtureCase(tf.test.TestCase, parameterized.TestCase):
    """Loads the fixture once; converted models are cached per pooling kernel."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with np.load(REFERENCE_PATH) as data:
            cls.reference = {k: data[k] for k in data.files}
        cls.images = nhwc(cls.reference["input"])
        cls.expected = nhwc(cls.reference["output"])
        cls._models = {}

    def converted(self, pool_impl="native"):
        if pool_impl not in self._models:
            state = torch_convert.load_state_dict(STATE_PATH)
            model = torch_convert.autoencoder_from_state_dict(state, pool_impl=pool_impl)
            self._models[pool_impl] = model
        return self._models[pool_impl]

    def assert_matches_reference(self, model, tolerance=TOLERANCE):
        output = model(self.images, training=False).numpy()
        diff = float(np.max(np.abs(output - self.expected)))
        self.assertLessEqual(diff, tolerance, f"max |keras - pytorch| = {diff:.3g}")
        return diff


class FixtureTest(FixtureCase):
    def test_fixture_has_the_authors_key_names_and_is_small(self):
        raw = raw_fixture()
        for key in ("encoder.conv11.weight", "encoder.bn53.running_var", "decoder.conv_final.bias"):
            self.assertIn(key, raw)
        self.assertIn("encoder.bn11.num_batches_tracked", raw)
        self.assertLess(os.path.getsize(STATE_PATH) + os.path.getsize(REFERENCE_PATH), 200_000)

    def test_config_is_inferred_from_the_checkpoint(self):
        config = torch_convert.config_from_state_dict(raw_fixture(), pool_impl="stock")
        widths = tuple(tuple(s) for s in json.loads(str(self.reference["stage_widths"])))
        self.assertEqual(config.stage_widths, widths)
        self.assertEqual((config.channels, config.pool_impl), (3, "stock"))
        self.assertEqual((config.bn_epsilon, config.bn_momentum), (1e-5, 0.9))

    @parameterized.parameters("native", "stock")
    def test_outputs_match_pytorch(self, pool_impl):
        self.assert_matches_reference(self.converted(pool_impl))

    @parameterized.parameters("native", "stock")
    def test_pooling_indices_and_tie_breaking_match_pytorch(self, pool_impl):
        encoder = ae_lib.get_encoder(self.converted(pool_impl))
        outputs = encoder(self.images, training=False)
        for stage in range(1, 6):
            expected = torch_to_tf_indices(self.reference[f"indices{stage}"])
            self.assertAllEqual(outputs[stage], expected, msg=f"stage {stage}")

    def test_fixture_exercises_all_zero_windows(self):
        encoder = ae_lib.get_encoder(self.converted())
        prepool = keras.Model(encoder.input, encoder.get_layer("relu12").output)
        x = prepool(self.images, training=False).numpy()
        n, h, w, c = x.shape
        windows = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        zero = windows == 0
        self.assertGreater(int(zero.sum()), 500)
        # In an all-zero window both frameworks pick the window's first (top-left) element.
        flat = torch_to_tf_indices(self.reference["indices1"])
        row, col = flat // (w * c) % h, flat // c % w
        top_left = (row % 2 == 0) & (col % 2 == 0)
        self.assertTrue(np.all(top_left[zero]))

    def test_purifier_normalises_around_the_autoencoder(self):
        mean, std = np.array(preprocessing.IMAGENET_MEAN), np.array(preprocessing.IMAGENET_STD)
        purifier = s2s_model.build_purifier(self.converted(), (32, 32, 3))
        output = purifier((self.images * std + mean).astype(np.float32), training=False).numpy()
        # The purifier clips its reconstruction to [0, 1], as the defended model sees it.
        expected = np.clip(self.expected * std + mean, 0.0, 1.0)
        self.assertAllClose(output, expected, atol=TOLERANCE, rtol=0)

    def test_composite_runs_at_a_size_that_needs_padding(self):
        classifier = classifiers.build_classifier_with_preprocessing("testing", (36, 36, 3), 10)
        defended = s2s_model.build_s2s_model(self.converted(), classifier)
        logits = defended(np.full((1, 36, 36, 3), 0.5, np.float32), training=False)
        self.assertEqual(logits.shape, (1, 10))

    @parameterized.named_parameters(
        ("model_state", lambda s: {"model_state": s, "epoch": 3}),
        ("state_dict", lambda s: {"state_dict": s, "optimizer": {}}),
        ("data_parallel", lambda s: {f"module.{k}": v for k, v in s.items()}),
        (
            "nested_data_parallel",
            lambda s: {"model_state": {f"module.{k}": v for k, v in s.items()}},
        ),
        ("bare_keys", lambda s: {k.split(".", 1)[1]: v for k, v in s.items()}),
        ("float64", lambda s: {k: v.astype(np.float64) for k, v in s.items()}),
        ("no_counters", lambda s: {k: v for k, v in s.items() if "num_batches" not in k}),
    )
    def test_accepted_layouts(self, transform):
        model = torch_convert.autoencoder_from_state_dict(transform(raw_fixture()))
        self.assert_matches_reference(model)

    def test_other_models_are_skipped_only_when_asked(self):
        state = {**raw_fixture(), "resnet.fc.weight": np.zeros((10, 4), np.float32)}
        with self.assertRaisesRegex(ValueError, r"'resnet.fc.weight'.*--skip_prefixes=resnet\."):
            torch_convert.canonical_state_dict(state)
        kept = torch_convert.canonical_state_dict(state, skip_prefixes=("resnet.",))
        self.assert_matches_reference(torch_convert.autoencoder_from_state_dict(kept))


def _drop(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _set(key, make):
    return lambda state: {**state, key: make(state.get(key))}


class MalformedStateTest(FixtureCase):
    @parameterized.named_parameters(
        ("missing", _drop("decoder.bn11d.running_var"), r"missing.*'decoder.bn11d.running_var'"),
        ("extra", _set("decoder.conv_extra.weight", lambda _: np.ones(3, np.float32)),
         r"unexpected tensor 'decoder.conv_extra.weight'"),
        ("extra_layer", _set("encoder.conv14.weight", lambda _: np.ones((6, 6, 3, 3), np.float32)),
         r"unexpected tensor 'encoder.conv14.weight'"),
        ("transposed", _set("encoder.conv22.weight", lambda w: w.transpose(1, 0, 2, 3)),
         r"'encoder.conv22.weight' has shape \(6, 8, 3, 3\).*needs \(8, 6, 3, 3\)"),
        ("hwio", _set("decoder.conv31d.weight", lambda w: w.transpose(2, 3, 1, 0)),
         r"'decoder.conv31d.weight' has shape \(3, 3, 8, 8\)"),
        ("bn_shape", _set("encoder.bn31.running_mean", lambda v: v[:-1]),
         r"'encoder.bn31.running_mean' has shape \(7,\).*needs \(8,\)"),
        ("int_dtype", _set("encoder.conv11.weight", lambda w: w.astype(np.int32)),
         r"'encoder.conv11.weight' has dtype int32"),
        ("not_finite", _set("encoder.bn12.running_var", lambda v: v * np.nan),
         r"'encoder.bn12.running_var' holds NaN"),
        ("not_a_tensor", _set("encoder.conv11.bias", lambda v: v.tolist()),
         r"'encoder.conv11.bias' is a list"),
        ("duplicate", _set("module.encoder.conv11.bias", lambda _: np.zeros(4, np.float32)),
         r"'encoder.conv11.bias' occurs twice"),
        ("wrong_part", _set("encoder.conv11d.weight", lambda _: np.zeros(1, np.float32)),
         r"unexpected tensor 'encoder.conv11d.weight'"),
    )  # fmt: skip
    def test_malformed_state_dicts_fail_naming_the_tensor(self, mutate, pattern):
        state = mutate(raw_fixture())
        with self.assertRaisesRegex(ValueError, pattern):
            torch_convert.autoencoder_from_state_dict(state)
        if all(isinstance(v, np.ndarray) for v in state.values()):  # the same through a file
            path = os.path.join(self.get_temp_dir(), "bad.npz")
            np.savez(path, **state)
            with self.assertRaisesRegex(ValueError, "bad.npz: .*" + pattern):
                torch_convert.load_autoencoder(path)

    def test_a_failed_conversion_leaves_the_model_untouched(self):
        model = ae_lib.build_autoencoder(torch_convert.config_from_state_dict(raw_fixture()))
        before = [w.numpy() for w in model.weights]
        with self.assertRaisesRegex(ValueError, "missing"):
            torch_convert.convert_state_dict(_drop("decoder.conv_final.bias")(raw_fixture()), model)
        for old, new in zip(before, model.weights, strict=True):
            self.assertAllEqual(old, new.numpy())

    def test_not_a_mapping(self):
        with self.assertRaisesRegex(ValueError, "expected a state dict .* got list"):
            torch_convert.canonical_state_dict([np.zeros(3)])

    def test_missing_first_conv(self):
        state = {k: v for k, v in raw_fixture().items() if not k.startswith("encoder.conv11")}
        with self.assertRaisesRegex(ValueError, "missing tensor 'encoder.conv11.weight'"):
            torch_convert.autoencoder_from_state_dict(state)


class FileFormatTest(FixtureCase):
    def path(self, name):
        return os.path.join(self.get_temp_dir(), name)

    def test_safetensors_round_trip_with_half_precisions(self):
        raw = raw_fixture()
        path = self.path("state.safetensors")
        write_safetensors(path, raw)
        loaded = checkpoint_files.read_safetensors(path)
        self.assertEqual(list(loaded), list(raw))
        for key, value in raw.items():
            self.assertAllEqual(loaded[key], value)
        self.assert_matches_reference(torch_convert.load_autoencoder(path))
        # F16 and BF16 exports load too (their round-off is the exporter's choice).
        half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in raw.items()}
        write_safetensors(path, half, bf16=("encoder.conv11.weight",))
        self.assertEqual(
            checkpoint_files.read_safetensors(path)["encoder.conv11.weight"].dtype, np.float32
        )
        torch_convert.load_autoencoder(path)

    @parameterized.named_parameters(
        ("short", b"\x01\x00", "shorter than"),
        ("huge_header", np.array(2**40, "<u8").tobytes() + b"{}", "header length"),
        ("bad_json", np.array(4, "<u8").tobytes() + b"{{{{", "bad JSON"),
        ("not_object", np.array(2, "<u8").tobytes() + b"[]", "not a JSON object"),
    )
    def test_malformed_safetensors(self, blob, pattern):
        path = self.path("bad.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        with self.assertRaisesRegex(ValueError, pattern):
            torch_convert.load_state_dict(path)

    @parameterized.named_parameters(
        ("offsets", {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "data offsets"),
        ("dtype", {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, "unsupported dtype"),
        ("entry", {"dtype": "F32"}, "malformed header entry"),
    )
    def test_malformed_safetensors_entries_name_the_tensor(self, entry, pattern):
        text = json.dumps({"encoder.conv11.bias": entry}).encode()
        path = self.path("bad.safetensors")
        with open(path, "wb") as f:
            f.write(np.array(len(text), "<u8").tobytes() + text + bytes(8))
        with self.assertRaisesRegex(ValueError, f"'encoder.conv11.bias'.*{pattern}"):
            torch_convert.load_state_dict(path)

    def test_npz_with_object_arrays_is_refused(self):
        path = self.path("objects.npz")
        np.savez(path, **{"encoder.conv11.weight": np.array([{"a": 1}], dtype=object)})
        with self.assertRaisesRegex(ValueError, "'encoder.conv11.weight' holds pickled Python"):
            torch_convert.load_state_dict(path)

    def test_pickle_named_npz_is_never_unpickled(self):
        path = self.path("state.npz")
        with open(path, "wb") as f:
            pickle.dump(raw_fixture(), f)
        with self.assertRaisesRegex(ValueError, "not an .npz archive.*never does"):
            torch_convert.load_state_dict(path)

    def test_single_npy_array_is_not_a_state_dict(self):
        path = self.path("array.npz")
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
        with self.assertRaisesRegex(ValueError, "single .npy array"):
            torch_convert.load_state_dict(path)

    def test_unknown_suffix_and_missing_file(self):
        path = self.path("state.ckpt")
        open(path, "wb").close()
        with self.assertRaisesRegex(ValueError, "unknown checkpoint type '.ckpt'"):
            torch_convert.load_state_dict(path)
        with self.assertRaisesRegex(FileNotFoundError, "checkpoint not found"):
            torch_convert.load_state_dict(self.path("absent.npz"))

    def test_pth_without_pytorch_says_how_to_get_it(self):
        path = self.path("state.pth")
        open(path, "wb").close()
        no_torch = mock.patch.dict(sys.modules, {"torch": None})
        with no_torch, self.assertRaisesRegex(ImportError, "pip install torch"):
            torch_convert.load_state_dict(path)

    def test_convert_file_writes_atomically_and_round_trips(self):
        out = self.path(os.path.join("out", "autoencoder.keras"))
        torch_convert.convert_file(STATE_PATH, out, input_shape=(32, 32))
        self.assertEqual(os.listdir(os.path.dirname(out)), ["autoencoder.keras"])
        loaded = torch_convert.load_autoencoder(out)
        self.assertEqual(loaded.input_shape, (None, 32, 32, 3))
        self.assert_matches_reference(loaded)

    def test_failed_conversion_writes_nothing(self):
        bad = self.path("bad.npz")
        np.savez(bad, **_drop("encoder.conv12.bias")(raw_fixture()))
        out = self.path(os.path.join("failed", "autoencoder.keras"))
        with self.assertRaisesRegex(ValueError, "missing tensor 'encoder.conv12.bias'"):
            torch_convert.convert_file(bad, out)
        self.assertFalse(os.path.exists(os.path.dirname(out)))


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_segnet_fixture", FIXTURE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@unittest.skipIf(torch is None, NO_TORCH)
class PyTorchTest(tf.test.TestCase):
    """Runs only where PyTorch is installed: full-size SegNet through `.pth` files."""

    def test_full_size_model_through_pth_matches_pytorch(self):
        fixture = _fixture_module()
        generator = torch.Generator().manual_seed(0)
        model = fixture.SegNet()  # the paper's VGG16 widths
        fixture.randomize_(model, generator)
        model.eval()
        x = torch.randn((2, 3, 64, 64), generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        path = os.path.join(self.get_temp_dir(), "s2snet.pth")
        state = {f"module.{k}": v for k, v in model.state_dict().items()}
        torch.save({"model_state": state, "epoch": 1}, path)
        converted = torch_convert.load_autoencoder(path)
        self.assertEqual(converted.count_params(), 29_496_259)
        output = converted(nhwc(x.numpy()), training=False).numpy()
        diff = float(np.max(np.abs(output - nhwc(expected))))
        self.assertLessEqual(diff, TOLERANCE, f"max |keras - pytorch| = {diff:.3g}")

    def test_pth_holding_a_list_is_not_a_state_dict(self):
        path = os.path.join(self.get_temp_dir(), "list.pth")
        torch.save([torch.zeros(3)], path)
        with self.assertRaisesRegex(ValueError, "list.pth: expected a state dict .* got list"):
            torch_convert.load_state_dict(path)

    def test_pickled_module_is_refused_by_weights_only(self):
        path = os.path.join(self.get_temp_dir(), "module.pth")
        torch.save(torch.nn.Linear(2, 2), path)
        with self.assertRaisesRegex(ValueError, "weights_only=True.*state_dict"):
            torch_convert.load_state_dict(path)

    def test_corrupt_pth(self):
        path = os.path.join(self.get_temp_dir(), "corrupt.pth")
        with open(path, "wb") as f:
            f.write(b"not a checkpoint")
        with self.assertRaisesRegex(ValueError, "corrupt.pth"):
            torch_convert.load_state_dict(path)


if __name__ == "__main__":
    tf.test.main()
