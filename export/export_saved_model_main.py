r"""Binary: export the defended classifier as a TF Serving SavedModel version.

  s2s_export --workdir=/tmp/s2s
  s2s_export --defended_path=defended.keras \
      --export_base=/srv/models/s2s --version=3 --overwrite
  s2s_export --autoencoder_path=ae.keras \
      --classifier_path=classifier.keras --export_base=/srv/models/s2s

Writes <export_base>/<version>/ (the next free version by default),
<export_base>/models.config and <export_base>/batching_parameters, and prints
the version directory.
"""

import os

from absl import app
from absl import flags
from absl import logging

from s2s_tf import constants
from s2s_tf.export import export_lib
from s2s_tf.flags import config_flags
from s2s_tf.flags import export_flags

FLAGS = flags.FLAGS


def config_from_flags():
    """Builds the `ExportConfig` from parsed flags."""
    if FLAGS.defended_path or FLAGS.autoencoder_path or FLAGS.init_from:
        sources = {
            "defended_path": FLAGS.defended_path,
            "autoencoder_path": FLAGS.autoencoder_path or FLAGS.init_from,
            "classifier_path": FLAGS.classifier_path,
        }
    else:
        sources = export_lib.default_sources(FLAGS.workdir)
    return export_lib.ExportConfig(
        export_base=FLAGS.export_base or constants.export_base(FLAGS.workdir),
        **config_flags.values(export_lib.ExportConfig),
        **sources,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = config_from_flags()
    try:
        config.validate()
        for path in (config.defended_path, config.autoencoder_path, config.classifier_path):
            if path and not os.path.exists(path):
                raise FileNotFoundError(f"model not found: {path}")
        path = export_lib.export(config)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise app.UsageError(str(e)) from None
    logging.info("exported %s", path)
    print(path, flush=True)


def run():
    """Console-script entry point."""
    export_flags.define_export_flags()
    app.run(main)


if __name__ == "__main__":
    run()
