r"""Binary: robustness evaluation of an S2SNet-defended classifier, with a report.

  python -m s2s_tf.evaluate_main --workdir=/tmp/s2s --dataset=fashion_mnist \
      --attacks=fgsm,pgd --eps=2/255,4/255,8/255,16/255 --num_examples=500

Reads <workdir>/stage2/defended.keras (or --defended_path, or --autoencoder_path
with --classifier_path) and writes robustness.json, report.md, plots and
TensorBoard summaries to <workdir>/eval_report (or --output_dir).
"""

import os

from absl import app
from absl import flags
from absl import logging

from s2s_tf import attacks
from s2s_tf import data as data_lib
from s2s_tf import eval_lib
from s2s_tf import evaluation
from s2s_tf.flags import common_flags
from s2s_tf.flags import eval_flags

FLAGS = flags.FLAGS


def config_from_flags():
    """Builds the `EvalRunConfig` from parsed flags."""
    composed = FLAGS.autoencoder_path or FLAGS.classifier_path
    defended = FLAGS.defended_path or (
        None if composed else os.path.join(FLAGS.workdir, "stage2", "defended.keras")
    )
    data = data_lib.DataConfig(
        **common_flags.data_config_kwargs(),
        split=FLAGS.eval_split,
        augment=False,
        num_examples=FLAGS.num_examples,
    )
    return eval_lib.EvalRunConfig(
        data=data,
        defended_path=defended,
        autoencoder_path=FLAGS.autoencoder_path,
        classifier_path=FLAGS.classifier_path,
        transfer_classifiers=eval_flags.parse_named_paths(FLAGS.transfer_classifiers),
        attack=evaluation.EvalConfig(
            attacks=tuple(FLAGS.attacks),
            eps=eval_flags.parse_eps_list(FLAGS.eps),
            threat_models=tuple(FLAGS.threat_models),
            num_examples=FLAGS.num_examples,
            batch_size=FLAGS.batch_size,
            steps=FLAGS.steps,
            restarts=FLAGS.restarts,
            spsa_examples=FLAGS.spsa_examples,
            seed=FLAGS.seed,
        ),
        gradient_examples=FLAGS.gradient_examples,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    config.validate()
    outdir = FLAGS.output_dir or os.path.join(FLAGS.workdir, "eval_report")
    eval_lib.evaluate(config, outdir, progress=logging.info)


def run():
    """Console-script entry point."""
    eval_flags.define_eval_flags(data_lib.SOURCES, attacks.ATTACKS)
    app.run(main)


if __name__ == "__main__":
    run()
