"""Tests of the exported SavedModel: round trip, servability, bad inputs, gradients, layout.

One tiny defended model is exported once per class; each signature is
compared with the in-memory Keras models, in this process and in a fresh one,
and through `saved_model_cli` (which loads it with a TF1 session, as the
model server does).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

from s2s_tf import data as data_lib
from s2s_tf import testing_utils
from s2s_tf.export import export_lib
from s2s_tf.export import serving_files
from s2s_tf.export import signatures
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers

SIZE = (16, 16)
TIMEOUT_S = 120
PY_FUNC_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
# Runs every signature of a SavedModel on saved inputs in a fresh interpreter.
ROUND_TRIP_SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf
model_dir, inputs_path, outputs_path = sys.argv[1:]
loaded = tf.saved_model.load(model_dir)
inputs = np.load(inputs_path, allow_pickle=True)
outputs = {}
for name, fn in loaded.signatures.items():
    key = "image_bytes" if name == "predict_image_bytes" else "images"
    for out, value in fn(**{key: tf.constant(inputs[key])}).items():
        outputs[f"{name}/{out}"] = value.numpy()
np.savez(outputs_path, **outputs)
"""


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _run(argv, cwd):
    return subprocess.run(
        argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def _classification(logits, top_k=5):
    logits = np.asarray(logits)
    probabilities = tf.nn.softmax(logits).numpy()
    order = np.argsort(-probabilities, axis=-1)[:, :top_k]
    return {
        "logits": logits,
        "probabilities": probabilities,
        "classes": np.argmax(logits, -1),
        "top_k_scores": np.take_along_axis(probabilities, order, -1),
        "top_k_classes": order,
    }


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


class ExportedModelTest(tf.test.TestCase, parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()
        models = testing_utils.build_tiny_defended(SIZE)
        autoencoder = models["autoencoder"]
        cls.classifier, cls.defended = models["classifier"], models["defended"]
        cls.purifier = models["purifier"]
        cls.paths = {
            name: os.path.join(cls.dir, f"{name}.keras")
            for name in ("defended", "autoencoder", "classifier")
        }
        cls.defended.save(cls.paths["defended"])
        autoencoder.save(cls.paths["autoencoder"])
        cls.classifier.save(cls.paths["classifier"])
        cls.base = os.path.join(cls.dir, "export")
        cls.config = export_lib.ExportConfig(
            export_base=cls.base, defended_path=cls.paths["defended"], warmup_batch_sizes=(1, 3)
        )
        cls.version_dir = export_lib.export(cls.config)
        cls.loaded = tf.saved_model.load(cls.version_dir)
        cls.images = serving_files.example_images(4, SIZE, seed=3)
        cls.image_bytes = serving_files.example_image_bytes(3, SIZE, seed=4)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)
        super().tearDownClass()

    def _expected(self):
        """Every signature's outputs computed by the in-memory Keras models."""
        decoded = np.stack(
            [
                data_lib.preprocess_eval(tf.io.decode_image(b, 3, expand_animations=False), SIZE)
                for b in self.image_bytes
            ]
        )
        return {
            signatures.DEFAULT_SIGNATURE: _classification(self.defended(self.images)),
            signatures.BYTES_SIGNATURE: _classification(self.defended(decoded)),
            signatures.PURIFY_SIGNATURE: {"purified_images": self.purifier(self.images)},
            signatures.UNDEFENDED_SIGNATURE: _classification(self.classifier(self.images)),
        }

    def _call(self, name, value):
        key = signatures.BYTES_INPUT if name == signatures.BYTES_SIGNATURE else "images"
        return self.loaded.signatures[name](**{key: tf.constant(value)})

    def _assert_serves(self):
        out = self._call(signatures.DEFAULT_SIGNATURE, self.images)
        self.assertAllClose(out["logits"], self.defended(self.images), rtol=1e-5, atol=1e-5)

    def test_layout(self):
        self.assertEqual(self.version_dir, os.path.join(self.base, "1"))
        self.assertCountEqual(os.listdir(self.base), ["1", "models.config", "batching_parameters"])
        extra = os.path.join(self.version_dir, "assets.extra")
        self.assertCountEqual(
            os.listdir(extra),
            [
                "tf_serving_warmup_requests",
                "export_config.json",
                "model_card.json",
                "model_card.md",
            ],
        )
        self.assertTrue(tf.saved_model.contains_saved_model(self.version_dir))
        with open(os.path.join(extra, "export_config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        self.assertEqual(saved["defended_path"], self.paths["defended"])
        self.assertEqual(saved["out_of_range"], "clip")

    def test_named_inputs_and_outputs(self):
        self.assertCountEqual(self.loaded.signatures, signatures.SIGNATURE_NAMES)
        for name, fn in self.loaded.signatures.items():
            (key,) = fn.structured_input_signature[1]
            outputs = set(fn.structured_outputs)
            if name == signatures.PURIFY_SIGNATURE:
                self.assertEqual(outputs, {"purified_images"})
            else:
                self.assertEqual(outputs, set(signatures.CLASSIFICATION_OUTPUTS))
            bytes_input = name == signatures.BYTES_SIGNATURE
            self.assertEqual(key, "image_bytes" if bytes_input else "images")

    def test_each_signature_equals_keras(self):
        expected = self._expected()
        for name in signatures.SIGNATURE_NAMES:
            value = self.image_bytes if name == signatures.BYTES_SIGNATURE else self.images
            out = self._call(name, value)
            for key, want in expected[name].items():
                self.assertAllClose(out[key], want, rtol=1e-5, atol=1e-5, msg=f"{name}/{key}")

    def test_round_trip_in_fresh_process(self):
        inputs = os.path.join(self.dir, "inputs.npz")
        outputs = os.path.join(self.dir, "outputs.npz")
        np.savez(inputs, images=self.images, image_bytes=self.image_bytes)
        argv = [sys.executable, "-c", ROUND_TRIP_SCRIPT, self.version_dir, inputs, outputs]
        result = _run(argv, cwd=self.dir)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        got = np.load(outputs)
        expected = self._expected()
        self.assertCountEqual(got.files, [f"{n}/{k}" for n, outs in expected.items() for k in outs])
        for name, outs in expected.items():
            for key, want in outs.items():
                self.assertAllClose(got[f"{name}/{key}"], want, rtol=1e-5, atol=1e-5)

    def test_saved_model_cli_show_and_run(self):
        cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
        shown = _run([cli, "show", "--dir", self.version_dir, "--all"], cwd=self.dir)
        self.assertEqual(shown.returncode, 0, shown.stderr[-3000:])
        for name in signatures.SIGNATURE_NAMES:
            self.assertIn(f"signature_def['{name}']", shown.stdout)
        for text in ("inputs['images']", "inputs['image_bytes']", "outputs['purified_images']"):
            self.assertIn(text, shown.stdout)
        for key in signatures.CLASSIFICATION_OUTPUTS:
            self.assertIn(f"outputs['{key}']", shown.stdout)
        np.save(os.path.join(self.dir, "x.npy"), self.images)
        outdir = os.path.join(self.dir, "cli_out")
        args = ["--tag_set", "serve", "--signature_def", "serving_default"]
        args += ["--inputs", "images=x.npy", "--outdir", outdir, "--overwrite"]
        ran = _run([cli, "run", "--dir", self.version_dir, *args], cwd=self.dir)
        self.assertEqual(ran.returncode, 0, ran.stderr[-3000:])
        classes = np.load(os.path.join(outdir, "classes.npy"))
        self.assertAllEqual(classes, np.argmax(self.defended(self.images), -1))

    @parameterized.named_parameters(
        ("float64", "images", np.zeros((2, 16, 16, 3)), "float"),
        ("strings", "images", np.array([b"x"]), "float"),
        ("rank3", "images", np.zeros((16, 16, 3), np.float32), "rank-4"),
        ("channels", "images", np.zeros((2, 16, 16, 1), np.float32), "3 \\(RGB\\) channels"),
        ("size", "images", np.zeros((2, 32, 32, 3), np.float32), "16x16 pixels"),
        ("nan", "images", np.full((2, 16, 16, 3), np.nan, np.float32), "NaN or Inf"),
        ("bytes_rank", "bytes", np.array(b"x", object), "rank-1"),
        ("bytes_empty", "bytes", np.array([b""], object), "image_bytes\\[0\\] is empty"),
        ("bytes_corrupt", "bytes", np.array([b"\x89PNG\r\n\x1a\nbroken"], object), "PNG"),
        ("bytes_floats", "bytes", np.zeros((2,), np.float32), "string"),
    )
    def test_bad_input_fails_and_serving_continues(self, kind, value, message):
        names = [signatures.BYTES_SIGNATURE]
        if kind == "images":
            names = [s for s in signatures.SIGNATURE_NAMES if s != signatures.BYTES_SIGNATURE]
        for name in names:
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, message, msg=name):
                self._call(name, value)
            self._assert_serves()

    def test_oversized_image_bytes(self):
        big = tf.io.encode_png(tf.zeros([4097, 2, 3], tf.uint8)).numpy()
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "4097x2 pixels"):
            self._call(signatures.BYTES_SIGNATURE, np.array([big], object))
        self._assert_serves()

    def test_out_of_range_is_clipped(self):
        wild = (self.images - 0.5) * 3.0
        for name in (signatures.DEFAULT_SIGNATURE, signatures.PURIFY_SIGNATURE):
            got, want = self._call(name, wild), self._call(name, np.clip(wild, 0.0, 1.0))
            for key in got:
                self.assertAllClose(got[key], want[key])

    def test_empty_batch_gives_empty_outputs(self):
        for name in signatures.SIGNATURE_NAMES:
            bytes_input = name == signatures.BYTES_SIGNATURE
            empty = np.array([], object) if bytes_input else np.zeros((0, *SIZE, 3), np.float32)
            for key, value in self._call(name, empty).items():
                self.assertEqual(value.shape[0], 0, f"{name}/{key}")

    def test_gradients_wrt_float_input(self):
        x = tf.constant(self.images)
        for name, model in (
            (signatures.DEFAULT_SIGNATURE, self.defended),
            (signatures.UNDEFENDED_SIGNATURE, self.classifier),
        ):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                loss = tf.reduce_sum(self._call(name, x)["logits"][:, 0])
                want_loss = tf.reduce_sum(model(x)[:, 0])
            got = tape.gradient(loss, x)
            self.assertIsNotNone(got, name)
            self.assertGreater(float(tf.reduce_max(tf.abs(got))), 0.0)
            self.assertAllClose(got, tape.gradient(want_loss, x), rtol=1e-4, atol=1e-5)

    def test_graph_has_only_stock_ops(self):
        with open(os.path.join(self.version_dir, "saved_model.pb"), "rb") as f:
            saved_model = saved_model_pb2.SavedModel.FromString(f.read())
        for meta_graph in saved_model.meta_graphs:
            library = meta_graph.graph_def.library.function
            functions = {fn.signature.name for fn in library}
            ops = {node.op for node in meta_graph.graph_def.node}
            ops |= {node.op for fn in library for node in fn.node_def}
            ops -= functions
            self.assertEmpty(ops & PY_FUNC_OPS)
            self.assertEmpty(sorted(op for op in ops if op_def_registry.get(op) is None))
            self.assertContainsSubset({"Assert", "DecodeImage", "MaxPoolWithArgmax"}, ops)

    def test_warmup_requests_run_against_the_model(self):
        path = os.path.join(self.version_dir, "assets.extra", "tf_serving_warmup_requests")
        requests = serving_files.read_warmup_requests(path)
        self.assertLen(requests, 2 * len(signatures.SIGNATURE_NAMES))
        for request in requests:
            self.assertEqual(request.model_spec.name, "s2s")
            fn = self.loaded.signatures[request.model_spec.signature_name]
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            outputs = fn(**inputs)
            self.assertEqual(set(outputs), set(fn.structured_outputs))
            (batch,) = {len(v) for v in inputs.values()}
            self.assertEqual({int(v.shape[0]) for v in outputs.values()}, {batch})


class ExportLibTest(tf.test.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()
        autoencoder = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,),)), input_shape=(*SIZE, 3)
        )
        classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, 3)
        cls.ae_path = os.path.join(cls.dir, "stage2", "autoencoder.keras")
        cls.classifier_path = os.path.join(cls.dir, "stage0", "classifier.keras")
        for model, path in ((autoencoder, cls.ae_path), (classifier, cls.classifier_path)):
            os.makedirs(os.path.dirname(path))
            model.save(path)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)
        super().tearDownClass()

    def test_versions_and_overwrite(self):
        base = os.path.join(self.get_temp_dir(), "versions")
        config = export_lib.ExportConfig(
            export_base=base, autoencoder_path=self.ae_path, classifier_path=self.classifier_path
        )
        self.assertEqual(export_lib.export(config), os.path.join(base, "1"))
        self.assertEqual(export_lib.export(config), os.path.join(base, "2"))
        marker = os.path.join(base, "2", "marker")
        open(marker, "w").close()
        with self.assertRaisesRegex(FileExistsError, "overwrite"):
            export_lib.export(dataclasses.replace(config, version=2))
        self.assertTrue(os.path.exists(marker))
        export_lib.export(dataclasses.replace(config, version=2, overwrite=True))
        self.assertFalse(os.path.exists(marker))
        self.assertTrue(tf.saved_model.contains_saved_model(os.path.join(base, "2")))
        self.assertEqual(export_lib.versions(base), [1, 2])
        self.assertEqual(export_lib.next_version(base), 3)
        self.assertEmpty([n for n in os.listdir(base) if n.startswith(".")])

    def test_clean_partial_exports(self):
        base = os.path.join(self.get_temp_dir(), "partial")
        dead, alive = _dead_pid(), os.getpid()
        names = [f".tmp-5-{dead}-ab12", f".old-3-{dead}-cd34", f".old-4-{dead}-ef56"]
        names += [f".tmp-6-{alive}-0a1b", "4"]
        for name in names:
            os.makedirs(os.path.join(base, name))
        export_lib.clean_partial_exports(base)
        # .tmp of a dead export: removed; .old whose version is missing: restored;
        # .old whose version landed: removed; a running export's .tmp: kept.
        self.assertCountEqual(os.listdir(base), ["3", "4", f".tmp-6-{alive}-0a1b"])

    def test_default_sources(self):
        self.assertEqual(
            export_lib.default_sources(self.dir),
            {"autoencoder_path": self.ae_path, "classifier_path": self.classifier_path},
        )
        empty = self.get_temp_dir()
        self.assertEqual(
            export_lib.default_sources(empty),
            {"defended_path": os.path.join(empty, "stage2", "defended.keras")},
        )

    def test_invalid_configs(self):
        good = {"export_base": "/tmp/x", "defended_path": "d.keras"}
        for bad in (
            {"export_base": ""},
            {"autoencoder_path": "a.keras"},
            {"defended_path": None, "autoencoder_path": "a.keras"},
            {"version": 0},
            {"model_name": "a b"},
            {"top_k": 0},
            {"out_of_range": "wrap"},
            {"warmup_batch_sizes": (0,)},
            {"image_size": (0, 4)},
        ):
            with self.assertRaises(ValueError, msg=str(bad)):
                export_lib.ExportConfig(**{**good, **bad}).validate()

    def test_image_size_must_match_the_classifier(self):
        autoencoder = keras.saving.load_model(self.ae_path)
        classifier = keras.saving.load_model(self.classifier_path)
        with self.assertRaisesRegex(ValueError, "differs"):
            export_lib.build_serving_models(autoencoder, classifier, (32, 32))
        models = export_lib.build_serving_models(autoencoder, classifier, SIZE)
        self.assertEqual(models.image_size, SIZE)

    def test_missing_model_file(self):
        config = export_lib.ExportConfig(
            export_base=os.path.join(self.get_temp_dir(), "missing"),
            defended_path=os.path.join(self.dir, "nope.keras"),
        )
        with self.assertRaisesRegex(FileNotFoundError, "defended model not found"):
            export_lib.export(config)
        self.assertFalse(os.path.exists(config.export_base))


if __name__ == "__main__":
    tf.test.main()
