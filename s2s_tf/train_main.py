r"""Binary: train one S2SNet stage (classifier, reconstruction or decoder fine-tuning).

  python -m s2s_tf.train_main --stage=stage0 --workdir=/tmp/s2s --dataset=fashion_mnist
  python -m s2s_tf.train_main --stage=stage1 --workdir=/tmp/s2s --dataset=fashion_mnist
  python -m s2s_tf.train_main --stage=stage2 --workdir=/tmp/s2s --dataset=fashion_mnist

Rerunning a command resumes from the stage's last checkpoint. SIGTERM saves a
checkpoint and exits with status 143.
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from s2s_tf import data as data_lib
from s2s_tf import distribute
from s2s_tf import optim
from s2s_tf import stages
from s2s_tf import train_lib
from s2s_tf import trainer
from s2s_tf.flags import common_flags
from s2s_tf.flags import train_flags
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers

FLAGS = flags.FLAGS


def data_configs():
    """(train, eval or None) `DataConfig`s from the flags."""
    train = data_lib.DataConfig(**common_flags.data_config_kwargs(), split=FLAGS.train_split)
    if not FLAGS.eval_split:
        return train, None
    return train, dataclasses.replace(
        train, split=FLAGS.eval_split, augment=False, num_examples=FLAGS.eval_examples
    )


def _classifier_path():
    """Stages 1-2 use --classifier_path, else stage 0's model unless weights are given."""
    if FLAGS.stage == "stage0" or FLAGS.classifier_path or FLAGS.classifier_weights:
        return FLAGS.classifier_path if FLAGS.stage != "stage0" else None
    path = train_flags.stage_dir_file(FLAGS.workdir, "stage0", stages.CLASSIFIER_FILE)
    return path if os.path.exists(path) else None


def _autoencoder_path():
    """Stage 2 fine-tunes --init_from or --autoencoder_path, else stage 1's model in the workdir."""
    if FLAGS.stage != "stage2":
        return None
    return (
        FLAGS.init_from
        or FLAGS.autoencoder_path
        or train_flags.stage_dir_file(FLAGS.workdir, "stage1", stages.AUTOENCODER_FILE)
    )


def config_from_flags():
    """Builds the `TrainConfig` from parsed flags."""
    train_data, eval_data = data_configs()
    model = stages.ModelConfig(
        classifier=FLAGS.classifier,
        num_classes=FLAGS.num_classes,
        classifier_weights=FLAGS.classifier_weights,
        classifier_path=_classifier_path(),
        image_size=train_data.image_size,
        autoencoder=ae_lib.AutoencoderConfig(
            stage_widths=common_flags.parse_stage_widths(FLAGS.ae_stage_widths),
            num_stages=FLAGS.ae_stages,
            pool_impl=FLAGS.ae_pool_impl,
        ),
        ae_init=FLAGS.ae_init,
        autoencoder_path=_autoencoder_path(),
    )
    return train_lib.TrainConfig(
        stage=FLAGS.stage,
        model=model,
        train_data=train_data,
        eval_data=eval_data,
        loop=trainer.LoopConfig(
            train_steps=FLAGS.train_steps,
            steps_per_loop=FLAGS.steps_per_loop,
            checkpoint_every=FLAGS.checkpoint_every,
            eval_every=FLAGS.eval_every,
            summary_every=FLAGS.summary_every,
            mixed_precision=FLAGS.mixed_precision,
            jit_compile=FLAGS.jit_compile,
        ),
        optimizer=optim.OptimizerConfig(
            name=FLAGS.optimizer,
            learning_rate=FLAGS.learning_rate,
            schedule=FLAGS.lr_schedule,
            warmup_steps=FLAGS.warmup_steps,
            momentum=FLAGS.momentum,
            weight_decay=FLAGS.weight_decay,
            clip_global_norm=FLAGS.clip_global_norm,
        ),
        reconstruction_loss=FLAGS.reconstruction_loss,
        stage2_loss=FLAGS.stage2_loss,
        reconstruction_weight=FLAGS.reconstruction_weight,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    config.validate()
    # Devices and collectives are configured before TensorFlow runs its first op.
    distribute.split_cpu(FLAGS.num_cpu_devices)
    strategy = distribute.create_strategy(FLAGS.strategy)
    try:
        distribute.check_global_batch(FLAGS.batch_size, strategy)
    except ValueError as e:
        raise app.UsageError(f"--batch_size={FLAGS.batch_size}: {e}") from None
    # A missing dataset (either split) fails here, before anything is written.
    data_lib.load_source(config.train_data)
    if config.eval_data is not None:
        data_lib.load_source(config.eval_data)
    logging.info("strategy %s with %d replicas", FLAGS.strategy, strategy.num_replicas_in_sync)
    if distribute.is_chief(strategy):
        stage_dir = os.path.join(FLAGS.workdir, FLAGS.stage)
        os.makedirs(stage_dir, exist_ok=True)
        with open(os.path.join(stage_dir, "flags.json"), "w", encoding="utf-8") as f:
            json.dump(FLAGS.flag_values_dict(), f, indent=2, sort_keys=True, default=str)
    result = train_lib.train(config, FLAGS.workdir, strategy)
    if result["preempted"]:
        sys.exit(143)


def run():
    """Console-script entry point."""
    train_flags.define_train_flags(data_lib.SOURCES, classifiers.CLASSIFIERS)
    app.run(main)


if __name__ == "__main__":
    run()
