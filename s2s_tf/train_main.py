r"""Binary: train one S2SNet stage (classifier, reconstruction or decoder fine-tuning).

  s2s_train --stage=stage0 --workdir=/tmp/s2s --dataset=fashion_mnist
  s2s_train --stage=stage1 --workdir=/tmp/s2s --dataset=fashion_mnist
  s2s_train --stage=stage2 --workdir=/tmp/s2s --dataset=fashion_mnist
  s2s_train --stage=stage2 --stage2_objective=adversarial --train_eps=8/255 ...

Rerunning a command resumes from the stage's last checkpoint. SIGTERM saves a
checkpoint and exits with status 143.
"""

import dataclasses
import json
import os
import sys

import keras
from absl import app
from absl import flags

from s2s_tf import constants
from s2s_tf import data as data_lib
from s2s_tf.flags import common_flags
from s2s_tf.flags import config_flags
from s2s_tf.flags import train_flags
from s2s_tf.train import adversarial
from s2s_tf.train import distribute
from s2s_tf.train import optim
from s2s_tf.train import stages
from s2s_tf.train import train_lib
from s2s_tf.train import trainer

FLAGS = flags.FLAGS


def config_from_flags():
    """Builds the `TrainConfig` from parsed flags."""
    stage, workdir = FLAGS.stage, FLAGS.workdir
    train_data = data_lib.DataConfig(**common_flags.data_config_kwargs(), split=FLAGS.train_split)
    eval_data = FLAGS.eval_split and dataclasses.replace(
        train_data, split=FLAGS.eval_split, augment=False, num_examples=FLAGS.eval_examples
    )
    # Stages 1-2 use --classifier_path, else stage 0's model unless weights are given.
    classifier_path = None
    if stage != "stage0":
        default = constants.classifier_path(workdir)
        use_default = not FLAGS.classifier_weights and os.path.exists(default)
        classifier_path = FLAGS.classifier_path or (default if use_default else None)
    autoencoder_path = None
    if stage == "stage2":
        autoencoder_path = (
            FLAGS.init_from or FLAGS.autoencoder_path or constants.autoencoder_path(workdir)
        )
    model = stages.ModelConfig(
        **common_flags.model_config_kwargs(),
        classifier_path=classifier_path,
        image_size=train_data.image_size,
        autoencoder_path=autoencoder_path,
    )
    return train_lib.TrainConfig(
        stage=stage,
        model=model,
        train_data=train_data,
        eval_data=eval_data or None,
        loop=trainer.LoopConfig(**config_flags.values(trainer.LoopConfig)),
        optimizer=optim.OptimizerConfig(**config_flags.values(optim.OptimizerConfig)),
        adversarial=adversarial.AdversarialConfig(
            **config_flags.values(adversarial.AdversarialConfig)
        ),
        **config_flags.values(train_lib.TrainConfig),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    config.validate()
    strategy = common_flags.strategy_from_flags()
    # Models built from scratch (stage 0, stage 1) start from --seed, so a run repeats.
    keras.utils.set_random_seed(config.train_data.seed)
    # A missing dataset (either split) fails here, before anything is written.
    for data in filter(None, (config.train_data, config.eval_data)):
        data_lib.load_source(data)
    if distribute.is_chief(strategy):
        stage_dir = constants.stage_dir(FLAGS.workdir, FLAGS.stage)
        os.makedirs(stage_dir, exist_ok=True)
        with open(os.path.join(stage_dir, "flags.json"), "w", encoding="utf-8") as f:
            json.dump(FLAGS.flag_values_dict(), f, indent=2, sort_keys=True, default=str)
    result = train_lib.train(config, FLAGS.workdir, strategy)
    if result["preempted"]:
        sys.exit(143)


def run():
    """Console-script entry point."""
    train_flags.define_train_flags()
    app.run(main)


if __name__ == "__main__":
    run()
