r"""Binary: robustness evaluation of an S2SNet-defended classifier, with a report.

  s2s_evaluate --workdir=/tmp/s2s --dataset=fashion_mnist --attack_preset=standard
  s2s_evaluate --workdir=/tmp/s2s --dataset=fashion_mnist --num_cpu_devices=2 --num_examples=all

The split streams through the attacks in shards of --eval_shard_size examples
under <output_dir>/shards (memory stays bounded whatever --num_examples), on
every replica of --strategy: rerunning an interrupted command continues where it
stopped. Several processes share the shards with --eval_workers and
--eval_worker_index (or --strategy=multi_worker and TF_CONFIG), each on its own
devices; worker 0 merges them and writes the report.

Reads <workdir>/stage2/defended.keras (or --defended_path, or --autoencoder_path
with --classifier_path) and writes robustness.json, report.md, plots and
TensorBoard summaries to <workdir>/eval_report (or --output_dir).
"""

import types

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
from s2s_tf.robustness import streaming

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
    # Evaluation reads each example once, as it is: no augmentation, whatever the flags say.
    data = data_lib.DataConfig(
        **{**common_flags.data_config_kwargs(), "split": FLAGS.eval_split, "augment": "off"}
    )
    return eval_lib.EvalRunConfig(
        data=data,
        defended_path=defended,
        autoencoder_path=FLAGS.autoencoder_path,
        classifier_path=FLAGS.classifier_path,
        attack=attack,
        stream=streaming.StreamConfig(**config_flags.values(streaming.StreamConfig)),
        **config_flags.values(eval_lib.EvalRunConfig),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    config.validate()
    worker = eval_flags.worker_from_flags()
    # Workers share shards, not collectives: each runs a strategy over its own devices,
    # configured before TensorFlow runs its first op.
    local = "mirrored" if FLAGS.strategy == "multi_worker" else FLAGS.strategy
    strategy = common_flags.strategy_from_flags(
        types.SimpleNamespace(
            strategy=local, num_cpu_devices=FLAGS.num_cpu_devices, batch_size=FLAGS.batch_size
        )
    )
    outdir = FLAGS.output_dir or constants.eval_report_dir(FLAGS.workdir)
    eval_lib.evaluate(
        config,
        outdir,
        progress=logging.info,
        strategy=strategy,
        worker=worker,
        image_size_given=FLAGS["image_size"].present,
    )


def run():
    """Console-script entry point."""
    eval_flags.define_eval_flags()
    app.run(main)


if __name__ == "__main__":
    run()
