"""Tests of export provenance: content hashes, and a new version whenever the inputs change."""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from s2s_tf import constants
from s2s_tf.export import export_lib
from s2s_tf.export import model_card
from s2s_tf.export import provenance
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model

SIZE = (8, 8)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    return path


class ProvenanceTest(tf.test.TestCase):
    def test_model_sources(self):
        self.assertEqual(
            provenance.model_sources({"defended_path": "d", "autoencoder_path": "a"}), ["d"]
        )
        both = {"defended_path": None, "autoencoder_path": "a", "classifier_path": "c"}
        self.assertEqual(provenance.model_sources(both), ["a", "c"])
        self.assertEqual(provenance.model_sources(None), [])

    def test_made_from_hashes_the_bytes(self):
        directory = self.get_temp_dir()
        model = _write(os.path.join(directory, "d.keras"), b"model bytes")
        report = _write(os.path.join(directory, "r.json"), '{"results": {}}')
        config = export_lib.ExportConfig(export_base=directory, defended_path=model, version=3)
        record = provenance.made_from(config, report)
        self.assertEqual(record["model_files"], {model: hashlib.sha256(b"model bytes").hexdigest()})
        self.assertEqual(record["report"], {"path": report, "sha256": _sha256(report)})
        self.assertNotIn("version", record["settings"])  # a version number is not an input
        self.assertEqual(record["settings"]["defended_path"], model)
        self.assertIsNone(provenance.made_from(config, None)["report"])

    def test_evaluated_is_exported(self):
        exported = {"a.keras": "aa", "c.keras": "cc"}
        sources = {"autoencoder_path": "a.keras", "classifier_path": "c.keras"}
        config = {"autoencoder_path": "/old/a.keras", "classifier_path": "/old/c.keras"}
        for recorded, expected in (
            ({"/old/a.keras": "aa", "/old/c.keras": "cc"}, True),  # other paths, same bytes
            ({"/old/a.keras": "aa", "/old/c.keras": "c2"}, False),  # one file differs
            ({"/old/a.keras": "aa"}, None),  # a hash missing: unknown
            (None, None),
        ):
            report = {"config": config, **({"model_files": recorded} if recorded else {})}
            out = provenance.evaluated_is_exported(report, sources, exported)
            self.assertIs(out["evaluated_model_is_exported"], expected, recorded)
            self.assertEqual(out["evaluated_model"], ["/old/a.keras", "/old/c.keras"])
        out = provenance.evaluated_is_exported({"config": {}}, sources, exported)
        self.assertIsNone(out["evaluated_model_is_exported"])
        self.assertEqual(out["evaluated_model"], "unknown")


class NewVersionWhenInputsChangeTest(tf.test.TestCase):
    """`export_unless_current`: the latest version is reused only for unchanged inputs."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(0)
        cls.workdir = tempfile.mkdtemp()
        cls.autoencoder = ae_lib.build_autoencoder(
            ae_lib.AutoencoderConfig(stage_widths=((4,),)), input_shape=(*SIZE, 3)
        )
        cls.classifier = classifiers.build_classifier_with_preprocessing("testing", SIZE, 3)
        cls.defended = constants.defended_path(cls.workdir)
        os.makedirs(os.path.dirname(cls.defended))
        s2s_model.build_s2s_model(cls.autoencoder, cls.classifier).save(cls.defended)
        cls.report = os.path.join(constants.eval_report_dir(cls.workdir), model_card.REPORT_JSON)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.workdir, ignore_errors=True)
        super().tearDownClass()

    def _write_report(self, clean):
        document = {
            "config": {"defended_path": self.defended},
            "model_files": {self.defended: _sha256(self.defended)},
            "results": {"clean": {"classifier": clean, "defended": clean}, "num_examples": 4},
        }
        _write(self.report, json.dumps(document))

    def _clean_in_card(self, version_dir):
        path = os.path.join(version_dir, "assets.extra", model_card.CARD_JSON)
        with open(path, encoding="utf-8") as f:
            return json.load(f)["evaluation"]["clean_accuracy"]["defended"]

    def test_versions_follow_the_models_and_the_report(self):
        base = os.path.join(self.workdir, "export")
        config = export_lib.ExportConfig(export_base=base, defended_path=self.defended)
        self._write_report(0.5)
        first = export_lib.export_unless_current(config)
        self.assertEqual(export_lib.export_unless_current(config), first)  # unchanged: reused
        self.assertEqual(export_lib.versions(base), [1])

        self._write_report(0.75)  # the evaluation was rerun
        second = export_lib.export_unless_current(config)
        self.assertEqual(export_lib.versions(base), [1, 2])
        self.assertEqual(self._clean_in_card(second), 0.75)  # the card describes the new run

        # Retrained in place: same path, other bytes.
        conv = ae_lib.get_decoder(self.autoencoder).get_layer("conv_final")
        conv.bias.assign(np.full(conv.bias.shape, 0.25, np.float32))
        s2s_model.build_s2s_model(self.autoencoder, self.classifier).save(self.defended)
        self.assertIsNone(export_lib.current_version(config))
        export_lib.export_unless_current(config)
        self.assertEqual(export_lib.versions(base), [1, 2, 3])

        # Another serving setting is another version too.
        self.assertIsNone(export_lib.current_version(dataclasses.replace(config, top_k=2)))
        # A version whose card records nothing (an older export) is never taken as current.
        card = os.path.join(base, "3", "assets.extra", model_card.CARD_JSON)
        _write(card, json.dumps({"evaluation": {}}))
        self.assertIsNone(export_lib.current_version(config))


if __name__ == "__main__":
    tf.test.main()
