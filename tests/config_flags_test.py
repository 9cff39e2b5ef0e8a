"""Tests for flags/config_flags.py: absl flags from the configs' setting declarations, and back."""

import dataclasses

import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from s2s_tf import config_io
from s2s_tf import data as data_lib
from s2s_tf import pipeline
from s2s_tf.config_io import setting
from s2s_tf.export import export_lib
from s2s_tf.flags import config_flags
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.robustness import eval_lib
from s2s_tf.robustness import evaluation
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import train_lib
from s2s_tf.train import trainer

# Every config with user-facing settings: its flags' defaults must be its own defaults.
CONFIGS = (
    data_lib.DataConfig,
    ae_lib.AutoencoderConfig,
    stages.ModelConfig,
    trainer.LoopConfig,
    optim.OptimizerConfig,
    train_lib.TrainConfig,
    evaluation.EvalConfig,
    eval_lib.EvalRunConfig,
    pipeline.PipelineConfig,
    export_lib.ExportConfig,
)


@dataclasses.dataclass(frozen=True)
class _Toy:
    steps: int = setting(3, "Steps.", lower_bound=1)
    rate: float = setting(0.5, "Rate.", check=config_io.check_positive)
    mode: str = setting("a", "Mode.", choices=("b", "a"))
    names: tuple = setting(("x",), "Names.", choices=("x", "y", "z"))
    size: tuple = setting(
        (4, 4),
        "Size.",
        flag="toy_size",
        parse=config_io.parse_image_size,
        unparse=config_io.unparse_image_size,
    )
    clip: float | None = setting(None, "Clip.", kind="float")
    on: bool = setting(False, "On.")
    hidden: int = 7  # no setting: not a flag


def _fresh(cls=_Toy, **kwargs):
    values = flags.FlagValues()
    names = config_flags.define(cls, flag_values=values, **kwargs)
    return values, names


class ConfigFlagsTest(parameterized.TestCase, tf.test.TestCase):
    def test_each_setting_becomes_one_flag_of_the_declared_type(self):
        values, names = _fresh()
        self.assertEqual(
            list(names.values()),
            ["steps", "rate", "mode", "names", "toy_size"]
            + [
                "clip",
                "on",
            ],
        )
        self.assertNotIn("hidden", values)
        self.assertEqual(values["steps"].flag_type(), "int")
        self.assertEqual(values["mode"].flag_type(), "string enum")
        self.assertEqual(values["on"].flag_type(), "bool")
        self.assertEqual(values["toy_size"].default, "4")
        self.assertEqual(values["steps"].help, "Steps.")

    def test_values_round_trip_to_the_dataclass(self):
        values, _ = _fresh()
        values(["prog", "--steps=5", "--toy_size=8,6", "--names=z,y", "--clip=2", "--on"])
        config = _Toy(**config_flags.values(_Toy, flag_values=values))
        self.assertEqual(
            config,
            _Toy(steps=5, size=(8, 6), names=("z", "y"), clip=2.0, on=True),
        )

    @parameterized.parameters(
        ("--steps=0", "steps"),
        ("--rate=-1", "rate"),
        ("--mode=c", "mode"),
        ("--names=x,w", "names"),
        ("--toy_size=3,4,5", "toy_size"),
        ("--toy_size=a", "toy_size"),
    )
    def test_bad_values_fail_at_parse_time_naming_the_flag(self, argument, name):
        values, _ = _fresh()
        with self.assertRaisesRegex(flags.Error, name):
            values(["prog", argument])

    def test_a_binary_can_take_its_own_defaults_and_names(self):
        values, names = _fresh(
            names=["steps", "size"],
            defaults=_Toy(steps=9, size=(2, 3)),
            flag_names={"steps": "toy_steps"},
        )
        self.assertEqual(names, {"steps": "toy_steps", "size": "toy_size"})
        values(["prog"])
        self.assertEqual(
            config_flags.values(
                _Toy, ["steps", "size"], flag_names={"steps": "toy_steps"}, flag_values=values
            ),
            {"steps": 9, "size": (2, 3)},
        )

    def test_unknown_setting_names_are_refused(self):
        with self.assertRaisesRegex(ValueError, "hidden"):
            _fresh(names=["hidden"])

    @parameterized.parameters(*CONFIGS)
    def test_flags_of_every_config_parse_back_to_its_defaults(self, cls):
        values, names = _fresh(cls)
        self.assertNotEmpty(names)
        values(["prog"])
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in names}
        self.assertEqual(config_flags.values(cls, flag_values=values), defaults)


if __name__ == "__main__":
    tf.test.main()
