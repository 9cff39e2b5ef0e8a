r"""Binary: robustness evaluation of an S2SNet-defended classifier, with a report.

  s2s_evaluate --workdir=/tmp/s2s --dataset=fashion_mnist --attack_preset=standard
  s2s_evaluate --workdir=/tmp/s2s --dataset=fashion_mnist --num_cpu_devices=2 --num_examples=all

Attacks run on every replica of --strategy (and every worker with
--strategy=multi_worker), in shards under <output_dir>/shards: rerunning an
interrupted command continues where it stopped.

Reads <workdir>/stage2/defended.keras (or --defended_path, or --autoencoder_path
with --classifier_path) and writes robustness.json, report.md, plots and
TensorBoard summaries to <workdir>/eval_report (or --output_dir).
"""

from absl import app
from absl import flags
from absl import logging

from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf.flags import common_flags
from s2s_tf.flags import config_flags
from s2s_tf.flags import eval_flags
from s2s_tf.robustness import eval_lib
from s2s_tf.robustness import evaluation

FLAGS = flags.FLAGS


def config_from_flags():
    """Builds the `EvalRunConfig` from parsed flags."""
    composed = FLAGS.autoencoder_path or FLAGS.classifier_path
    defended = FLAGS.defended_path or (None if composed else constants.defended_path(FLAGS.workdir))
    # The preset's attack suite, with the attack flags given explicitly on top.
    attack = evaluation.preset(
        FLAGS.attack_preset,
        **config_flags.values(evaluation.EvalConfig, only_given=True),
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
    )
    data = data_lib.DataConfig(
        **common_flags.data_config_kwargs(),
        split=FLAGS.eval_split,
        augment=False,
    )
    return eval_lib.EvalRunConfig(
        data=data,
        defended_path=defended,
        autoencoder_path=FLAGS.autoencoder_path,
        classifier_path=FLAGS.classifier_path,
        attack=attack,
        **config_flags.values(eval_lib.EvalRunConfig),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    config.validate()
    # Devices and collectives are configured before TensorFlow runs its first op.
    strategy = common_flags.strategy_from_flags()
    outdir = FLAGS.output_dir or constants.eval_report_dir(FLAGS.workdir)
    eval_lib.evaluate(config, outdir, progress=logging.info, strategy=strategy)


def run():
    """Console-script entry point."""
    eval_flags.define_eval_flags()
    app.run(main)


if __name__ == "__main__":
    run()
