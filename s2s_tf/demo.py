"""The main job on the embedded data: build the defended model and run it on one batch.

`run_demo` loads a batch from the configured source (Fashion-MNIST by
default, offline), builds the S2SNet autoencoder, the classifier and the
composite defended model with the same builders that training, evaluation and
export use, runs them, and prints model summaries and batch statistics.
"""

import dataclasses
import json
import time

import numpy as np

from s2s_tf import config_io
from s2s_tf import data as data_lib
from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import classifiers
from s2s_tf.models import s2s_model
from s2s_tf.models import vgg16_init

# A 3-stage SegNet suits 28-32 px images; the paper's 5 stages need >= 64 px.
SMALL_AUTOENCODER = ae_lib.AutoencoderConfig(num_stages=3)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo builds and runs.

    Attributes:
      data: the data source and batch (evaluation pipeline, no augmentation).
      classifier: a key of `classifiers.CLASSIFIERS`.
      num_classes: classifier outputs.
      classifier_weights: None, "imagenet" or a local weights file.
      autoencoder: the autoencoder's shape.
      ae_init: None, or VGG16 weights ("imagenet" or a file) for the encoder.
      num_shown: how many examples of the batch to print.
    """

    data: data_lib.DataConfig = data_lib.DataConfig(split="test", global_batch_size=16)
    classifier: str = "small_cnn"
    num_classes: int = 10
    classifier_weights: str | None = None
    autoencoder: ae_lib.AutoencoderConfig = SMALL_AUTOENCODER
    ae_init: str | None = None
    num_shown: int = 8


def build_models(config):
    """Builds (autoencoder, [0, 1]-input classifier, defended composite) for `config`."""
    shape = (*config.data.image_size, 3)
    autoencoder = ae_lib.build_autoencoder(config.autoencoder, input_shape=shape)
    if config.ae_init:
        vgg16_init.init_encoder_from_vgg16(autoencoder, config.ae_init)
    classifier = classifiers.build_classifier_with_preprocessing(
        config.classifier, shape, config.num_classes, config.classifier_weights
    )
    return autoencoder, classifier, s2s_model.build_s2s_model(autoencoder, classifier)


def _print_batch(images, labels, logits, defended_logits, reconstruction, num_shown, print_fn):
    print_fn(
        f"batch: images {images.shape} {images.dtype} in [{images.min():.3f}, "
        f"{images.max():.3f}], labels {labels.shape} {labels.dtype}"
    )
    mse = float(np.mean((reconstruction - images) ** 2))
    print_fn(f"reconstruction MSE in [0, 1] units (untrained autoencoder): {mse:.5f}")
    print_fn(f"logits {logits.shape}; first {num_shown} examples:")
    print_fn("  label  classifier  defended")
    for i in range(min(num_shown, len(labels))):
        print_fn(
            f"  {labels[i]:5d}  {int(np.argmax(logits[i])):10d}  "
            f"{int(np.argmax(defended_logits[i])):8d}"
        )


def run_demo(config, workdir=None, print_fn=print):
    """Builds the models, runs one batch through them and prints what it sees.

    Args:
      config: a `DemoConfig`.
      workdir: if given, `config.json` and `summary.json` are written there.
      print_fn: where the report goes (a callable taking one string).

    Returns:
      A dict with the parameter counts, batch shape and output shapes.
    """
    start = time.time()
    dataset = data_lib.make_dataset_fn(config.data, training=False)(None)
    images, labels = (t.numpy() for t in next(iter(dataset)))
    autoencoder, classifier, defended = build_models(config)
    autoencoder.summary(print_fn=print_fn, expand_nested=True)
    defended.summary(print_fn=print_fn)
    purifier = s2s_model.build_purifier(autoencoder, images.shape[1:])
    reconstruction = purifier(images, training=False).numpy()
    logits = classifier(images, training=False).numpy()
    defended_logits = defended(images, training=False).numpy()
    _print_batch(
        images, labels, logits, defended_logits, reconstruction, config.num_shown, print_fn
    )
    summary = {
        "autoencoder_params": autoencoder.count_params(),
        "classifier_params": classifier.count_params(),
        "defended_params": defended.count_params(),
        "batch_shape": list(images.shape),
        "logits_shape": list(defended_logits.shape),
        "seconds": round(time.time() - start, 2),
    }
    print_fn(json.dumps(summary))
    if workdir:
        config_io.save_config(config, workdir)
        with open(f"{workdir}/summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary
