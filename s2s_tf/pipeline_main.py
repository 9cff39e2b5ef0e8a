r"""Binary: the whole pipeline on one dataset - classifier, S2SNet, report, export.

  s2s_pipeline                       # Fashion-MNIST, offline
  s2s_pipeline --fresh               # start again
  s2s_pipeline --robust --attack_preset=standard   # + adversarial S2SNet and classifier

Rerunning continues where the last run stopped; finished stages are reused.
"""

import dataclasses
import os
import shutil

from absl import app
from absl import flags

from s2s_tf import config_io
from s2s_tf import data as data_lib
from s2s_tf import pipeline
from s2s_tf import robust_pipeline
from s2s_tf.flags import common_flags
from s2s_tf.flags import config_flags
from s2s_tf.flags import pipeline_flags
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.robustness import evaluation
from s2s_tf.train import adversarial

FLAGS = flags.FLAGS


def config_from_flags():
    """Builds the `PipelineConfig` from parsed flags."""
    defaults = pipeline.PipelineConfig()
    # The preset's own values, except where an attack flag is given: the flags' defaults
    # are the fast preset's.
    given = config_flags.values(
        evaluation.EvalConfig,
        pipeline_flags.ATTACK_SETTINGS,
        flag_names=pipeline_flags.ATTACK_FLAG_NAMES,
        only_given=FLAGS.attack_preset != defaults.attack_preset,
    )
    widths = config_flags.values(ae_lib.AutoencoderConfig, ["stage_widths"])
    return pipeline.PipelineConfig(
        data=data_lib.DataConfig(**common_flags.data_config_kwargs()),
        autoencoder=dataclasses.replace(defaults.autoencoder, **widths),
        attack=evaluation.preset(FLAGS.attack_preset, **given, seed=FLAGS.seed),
        adversarial=adversarial.AdversarialConfig(
            **config_flags.values(adversarial.AdversarialConfig)
        ),
        **config_flags.values(pipeline.PipelineConfig),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    config.attack.validate()
    config.adversarial.validate()
    config.autoencoder.validate()
    if config.robust:
        for name in ("robust_stage2_steps", "robust_classifier_steps"):
            config.adversarial.check_ramp(getattr(config, name), name)
    if FLAGS.fresh and os.path.isdir(FLAGS.workdir):
        shutil.rmtree(FLAGS.workdir)
    strategy = common_flags.strategy_from_flags()
    data_lib.load_source(config.data)  # a missing dataset fails here, before any work
    config_io.save_config(config, FLAGS.workdir)
    (robust_pipeline if config.robust else pipeline).run(config, FLAGS.workdir, strategy)


def run():
    """Console-script entry point."""
    pipeline_flags.define_pipeline_flags()
    app.run(main)


if __name__ == "__main__":
    run()
