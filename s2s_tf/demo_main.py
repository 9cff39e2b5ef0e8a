r"""Binary: build the S2SNet-defended model on a data source and run one batch.

Usage:
  s2s_demo --dataset=fashion_mnist --classifier=small_cnn \
      --workdir=/tmp/s2s_demo
"""

from absl import app
from absl import flags

from s2s_tf import data as data_lib
from s2s_tf import demo
from s2s_tf.flags import common_flags

FLAGS = flags.FLAGS


def define_flags():
    """Defines this binary's flags."""
    common_flags.define_workdir_flag(required=False)
    common_flags.define_data_flags()
    common_flags.define_model_flags()
    flags.DEFINE_string("split", "test", "Split to take the batch from.")


def config_from_flags():
    """Builds the `DemoConfig` from parsed flags."""
    # The demo shows one batch as it is: no augmentation, whatever the flags say.
    data = data_lib.DataConfig(
        **{**common_flags.data_config_kwargs(), "split": FLAGS.split, "augment": "off"}
    )
    return demo.DemoConfig(data=data, **common_flags.model_config_kwargs())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    demo.run_demo(config_from_flags(), workdir=FLAGS.workdir)


def run():
    """Console-script entry point."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
