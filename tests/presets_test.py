"""Each paper preset (flags/presets/*.cfg) parses with the training binary and builds its models."""

import importlib.resources
import json
import subprocess
import sys
import tempfile
import textwrap
import unittest

PRESETS = sorted(
    str(path)
    for path in (importlib.resources.files("s2s_tf.flags") / "presets").iterdir()
    # eval_*.cfg presets hold s2s_evaluate's flags, not the training binary's.
    if path.name.endswith(".cfg") and not path.name.startswith("eval_")
)

# Runs in a fresh process: absl flags are global, and other tests define other binaries' flags.
SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    from absl import flags
    from s2s_tf import train_main
    from s2s_tf.flags import train_flags
    from s2s_tf.models import autoencoder as ae_lib
    from s2s_tf.train import stages

    train_flags.define_train_flags()
    out = {}
    for preset in sys.argv[2:]:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["train_main", f"--flagfile={preset}", "--stage=stage1",
                     f"--workdir={sys.argv[1]}"])
        config = train_main.config_from_flags()
        config.validate()
        # No internet here: build with random weights instead of downloading them.
        model = dataclasses.replace(config.model, classifier_weights=None, ae_init=None)
        classifier = stages.load_or_build_classifier(model)
        ae = ae_lib.build_autoencoder(model.autoencoder, input_shape=(*model.image_size, 3))
        out[preset] = {
            "classifier": config.model.classifier,
            "classifier_output": list(classifier.output_shape),
            "image_size": list(config.model.image_size),
            "ae_params": ae.count_params(),
            "strategy": flags.FLAGS.strategy,
            "weights": config.model.classifier_weights,
        }
    print(json.dumps(out))
    """
)


class PresetsTest(unittest.TestCase):
    def test_presets_exist(self):
        names = {p.rsplit("/", 1)[-1] for p in PRESETS}
        for network in ("resnet50", "inception_v3", "vgg16", "alexnet"):
            self.assertIn(f"imagenet_{network}.cfg", names)
        self.assertIn("imagenet_resnet50_multi_worker.cfg", names)

    def test_each_preset_parses_and_builds_its_models(self):
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, tempfile.mkdtemp(), *PRESETS],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tempfile.gettempdir(),
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        built = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual(sorted(built), PRESETS)
        for preset, info in built.items():
            self.assertEqual(info["classifier_output"], [None, 1000], preset)
            self.assertEqual(info["ae_params"], 29_496_259, preset)  # the paper's SegNet
            expected = 299 if info["classifier"] == "inception_v3" else 224
            self.assertEqual(info["image_size"], [expected, expected], preset)
            self.assertTrue(info["weights"], preset)
            multi = preset.endswith("_multi_worker.cfg")
            self.assertEqual(info["strategy"], "multi_worker" if multi else "mirrored", preset)


if __name__ == "__main__":
    unittest.main()
