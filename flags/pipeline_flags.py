"""Flags of the pipeline binary (`s2s_tf.pipeline_main`): data -> defense -> report -> export.

Every setting and its default comes from `pipeline.PipelineConfig` (its data,
autoencoder and attack parts included), so the flags' defaults are the main
job's configuration.
"""

from absl import flags

from s2s_tf import pipeline
from s2s_tf.flags import common_flags
from s2s_tf.flags import config_flags
from s2s_tf.robustness import evaluation
from s2s_tf.train import adversarial

# The pipeline's attack settings; --attack_steps because --steps would read as training steps.
ATTACK_SETTINGS = ("num_examples", "gradient_free_examples", "steps", "eps")
ATTACK_FLAG_NAMES = {"steps": "attack_steps"}


def define_pipeline_flags():
    """Defines every flag of the pipeline binary."""
    defaults = pipeline.PipelineConfig()
    common_flags.define_data_flags(defaults=defaults.data)
    flags.DEFINE_string("workdir", "workdir/fmnist", "Directory of the whole run.")
    flags.DEFINE_bool("fresh", False, "Delete --workdir first and start again.")
    config_flags.define(pipeline.PipelineConfig)
    common_flags.define_autoencoder_flags(defaults.autoencoder, names=["stage_widths"])
    config_flags.define(
        evaluation.EvalConfig,
        ATTACK_SETTINGS,
        defaults=defaults.attack,
        flag_names=ATTACK_FLAG_NAMES,
    )
    # The inner attack of --robust's adversarial training and its held-out check.
    config_flags.define(adversarial.AdversarialConfig, defaults=defaults.adversarial)
    common_flags.define_strategy_flags(choices=("mirrored", "one_device"))
