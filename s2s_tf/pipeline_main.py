r"""Binary: the whole pipeline on one dataset - classifier, S2SNet, report, export.

  python -m s2s_tf.pipeline_main                       # Fashion-MNIST, offline
  python -m s2s_tf.pipeline_main --fresh               # start again

Rerunning continues where the last run stopped; finished stages are reused.
"""

import dataclasses
import os
import shutil

from absl import app
from absl import flags

from s2s_tf import config_io
from s2s_tf import data as data_lib
from s2s_tf import distribute
from s2s_tf import pipeline
from s2s_tf.flags import common_flags
from s2s_tf.flags import pipeline_flags
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers

FLAGS = flags.FLAGS


def config_from_flags():
    """Builds the `PipelineConfig` from parsed flags."""
    defaults = pipeline.PipelineConfig()
    return pipeline.PipelineConfig(
        data=data_lib.DataConfig(**common_flags.data_config_kwargs()),
        eval_split=FLAGS.eval_split,
        classifier=FLAGS.classifier,
        transfer_classifier=FLAGS.transfer_classifier,
        autoencoder=ae_lib.AutoencoderConfig(
            stage_widths=common_flags.parse_stage_widths(FLAGS.ae_stage_widths)
        ),
        classifier_steps=FLAGS.classifier_steps,
        stage1_steps=FLAGS.stage1_steps,
        stage2_steps=FLAGS.stage2_steps,
        learning_rate=FLAGS.learning_rate,
        attack=dataclasses.replace(
            defaults.attack,
            num_examples=FLAGS.num_examples,
            spsa_examples=FLAGS.spsa_examples,
            steps=FLAGS.attack_steps,
            seed=FLAGS.seed,
        ),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    config.attack.validate()
    config.autoencoder.validate()
    if FLAGS.fresh and os.path.isdir(FLAGS.workdir):
        shutil.rmtree(FLAGS.workdir)
    strategy = distribute.create_strategy(FLAGS.strategy)
    try:
        distribute.check_global_batch(FLAGS.batch_size, strategy)
    except ValueError as e:
        raise app.UsageError(f"--batch_size={FLAGS.batch_size}: {e}") from None
    data_lib.load_source(config.data)  # a missing dataset fails here, before any work
    config_io.save_config(config, FLAGS.workdir)
    pipeline.run(config, FLAGS.workdir, strategy)


def run():
    """Console-script entry point."""
    pipeline_flags.define_pipeline_flags(data_lib.SOURCES, classifiers.CLASSIFIERS)
    app.run(main)


if __name__ == "__main__":
    run()
