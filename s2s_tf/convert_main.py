r"""Binary: convert the authors' PyTorch S2SNet checkpoint into a Keras autoencoder.

  s2s_convert --checkpoint=s2snet_resnet50.pth --output=autoencoder.keras
  s2s_convert --checkpoint=s2snet.npz --output=ae.keras --image_size=256

Reads a `.pth`/`.pt` state dict (needs PyTorch; loaded with weights_only=True)
or a `.npz`/`.safetensors` export of it, builds the autoencoder with the
checkpoint's widths, assigns every tensor by name, writes the `.keras` file
atomically and prints its path. Stage 2, evaluation and export take the file
as their autoencoder (ImageNet-normalised RGB in and out).
"""

from absl import app
from absl import flags
from absl import logging

from s2s_tf import config_io
from s2s_tf.flags import convert_flags
from s2s_tf.models import torch_convert

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    input_shape = None
    if FLAGS.image_size:
        input_shape = config_io.parse_image_size(FLAGS.image_size)
    try:
        model = torch_convert.convert_file(
            FLAGS.checkpoint,
            FLAGS.output,
            input_shape=input_shape,
            skip_prefixes=tuple(FLAGS.skip_prefixes),
            pool_impl=FLAGS.pool_impl,
        )
    except (ValueError, ImportError) as e:
        raise app.UsageError(str(e)) from None
    logging.info(
        "converted %s: %d parameters, input %s",
        FLAGS.checkpoint,
        model.count_params(),
        model.input_shape,
    )
    print(FLAGS.output, flush=True)


def run():
    """Console-script entry point."""
    convert_flags.define_convert_flags(torch_convert.CHECKPOINT_SUFFIXES)
    app.run(main)


if __name__ == "__main__":
    run()
