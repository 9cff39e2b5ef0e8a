"""The S2SNet autoencoder: SegNet with VGG16 encoder topology and index-based unpooling.

The model reproduces the authors' PyTorch `SegNet` (spalaciob/s2snets-reconstruction,
`models/segnet_autoencoder.py`): 13 conv3x3+BN+ReLU in the VGG16 layout, five
2x2 max-pools that keep their argmax indices, a mirrored decoder that
max-unpools with those indices (no transposed convolutions, no upsampling by
repetition) and a final linear 1x1 convolution. Layer names follow the
authors' state dict (`conv11` ... `conv53`, `conv53d` ... `conv11d`,
`conv_final`, `bn*`), so their checkpoints map by name.

The autoencoder works in one fixed normalised space (ImageNet mean/std on
[0, 1] RGB, see `preprocessing.Normalize`); the composite model converts to and
from it. The model is split into two nested functional models, `encoder` and
`decoder`, so training code can freeze the encoder and cut gradients at the
bottleneck and indices (stage 2).
"""

import dataclasses

import keras

from s2s_tf import config_io
from s2s_tf.config_io import setting
from s2s_tf.models import layers as s2s_layers

VGG16_STAGE_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
ENCODER_NAME = "encoder"
DECODER_NAME = "decoder"


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of the SegNet autoencoder.

    Attributes:
      stage_widths: conv widths of each encoder stage; the decoder mirrors them.
      num_stages: how many of `stage_widths` to use (None: all). 2-3 stages suit
        28-64 px inputs; inputs are padded to a multiple of 2**num_stages.
      channels: image channels in and out.
      bn_momentum: Keras BatchNorm momentum (0.9 = PyTorch's momentum 0.1).
      bn_epsilon: BatchNorm epsilon (1e-5, PyTorch's default, as the authors).
      sync_batchnorm: synchronise BatchNorm statistics across replicas, so a
        run on N replicas matches one replica with the same global batch.
      pool_impl: "native" (`tf.nn.max_pool_with_argmax`) or "stock" (stock ops,
        compiles under XLA `jit_compile=True`).
      pad_mode: padding used to reach a multiple of 2**num_stages.
    """

    stage_widths: tuple = setting(
        VGG16_STAGE_WIDTHS,
        "Autoencoder encoder widths, stages split by ';' (the decoder mirrors them).",
        flag="ae_stage_widths",
        parse=config_io.parse_stage_widths,
        unparse=config_io.unparse_stage_widths,
    )
    num_stages: int | None = setting(
        None,
        "How many of --ae_stage_widths to use (5 = the paper's SegNet).",
        flag="ae_stages",
        lower_bound=1,
        kind="int",
    )
    channels: int = 3
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    sync_batchnorm: bool = False
    pool_impl: str = setting(
        "native",
        "Pooling kernel ('stock' compiles with XLA).",
        flag="ae_pool_impl",
        choices=s2s_layers.POOL_IMPLS,
    )
    pad_mode: str = "reflect"

    @property
    def stages(self):
        """The stage widths actually used, as a tuple of tuples."""
        n = len(self.stage_widths) if self.num_stages is None else self.num_stages
        return tuple(tuple(s) for s in self.stage_widths[:n])

    def validate(self):
        """Raises ValueError naming the first invalid field."""
        if not self.stage_widths:
            raise ValueError("stage_widths must name at least one stage")
        for i, stage in enumerate(self.stage_widths):
            if not stage or any(not isinstance(w, int) or w < 1 for w in stage):
                raise ValueError(
                    f"stage_widths[{i}] must be a non-empty sequence of positive ints, "
                    f"got {stage!r}"
                )
        if self.num_stages is not None and not 1 <= self.num_stages <= len(self.stage_widths):
            raise ValueError(
                f"num_stages must be in [1, {len(self.stage_widths)}] (the number of "
                f"stage_widths), got {self.num_stages}"
            )
        if not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"channels must be a positive int, got {self.channels!r}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(
                f"bn_momentum must be in [0, 1) (Keras convention), got {self.bn_momentum}"
            )
        if self.bn_epsilon <= 0:
            raise ValueError(f"bn_epsilon must be > 0, got {self.bn_epsilon}")
        if self.pool_impl not in s2s_layers.POOL_IMPLS:
            raise ValueError(
                f"pool_impl must be one of {s2s_layers.POOL_IMPLS}, got {self.pool_impl!r}"
            )
        if self.pad_mode not in ("reflect", "symmetric", "constant"):
            raise ValueError(
                f"pad_mode must be reflect, symmetric or constant, got {self.pad_mode!r}"
            )


def _conv_bn_relu(x, filters, name, config):
    """conv3x3 (same padding, bias as in PyTorch) + BatchNorm + ReLU, named like the authors."""
    x = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{name}")(x)
    x = keras.layers.BatchNormalization(
        momentum=config.bn_momentum,
        epsilon=config.bn_epsilon,
        synchronized=config.sync_batchnorm,
        name=f"bn{name}",
    )(x)
    return keras.layers.ReLU(name=f"relu{name}")(x)


def build_encoder(config, input_shape=(None, None, 3)):
    """Builds the encoder: image -> [bottleneck, indices of stage 1, ..., indices of stage S].

    Args:
      config: an `AutoencoderConfig`.
      input_shape: (H, W, C) of the (already padded) input; H and W must be
        multiples of 2**num_stages where known.

    Returns:
      A functional `keras.Model` named "encoder".
    """
    inputs = keras.Input(input_shape, name="image")
    x, indices = inputs, []
    for s, widths in enumerate(config.stages, start=1):
        for j, width in enumerate(widths, start=1):
            x = _conv_bn_relu(x, width, f"{s}{j}", config)
        x, idx = s2s_layers.MaxPoolWithArgmax(config.pool_impl, name=f"pool{s}")(x)
        indices.append(idx)
    return keras.Model(inputs, [x, *indices], name=ENCODER_NAME)


def build_decoder(config, encoder):
    """Builds the decoder mirroring `encoder`: [bottleneck, indices...] -> reconstruction.

    Decoder conv `k` mirrors encoder conv `k` (which maps c_{k-1} -> c_k) and
    maps c_k -> c_{k-1}; the first encoder conv's mirror keeps its width (the
    authors' `conv11d` is 64->64) and a linear 1x1 conv maps to `channels`.

    Args:
      config: the `AutoencoderConfig` the encoder was built with.
      encoder: the model from `build_encoder`, whose output shapes the decoder takes.

    Returns:
      A functional `keras.Model` named "decoder".
    """
    bottleneck_shape, *index_shapes = [t.shape[1:] for t in encoder.outputs]
    bottleneck = keras.Input(bottleneck_shape, name="bottleneck")
    indices = [
        keras.Input(shape, dtype="int64", name=f"indices{s}")
        for s, shape in enumerate(index_shapes, start=1)
    ]
    stages = config.stages
    x = bottleneck
    for s in range(len(stages), 0, -1):
        widths = stages[s - 1]
        stage_input = stages[s - 2][-1] if s > 1 else widths[0]
        x = s2s_layers.MaxUnpool(name=f"unpool{s}")([x, indices[s - 1]])
        outs = list(widths[-2::-1]) + [stage_input]  # mirrored widths, ending at the stage input
        for j, width in zip(range(len(widths), 0, -1), outs, strict=True):
            x = _conv_bn_relu(x, width, f"{s}{j}d", config)
    outputs = keras.layers.Conv2D(config.channels, 1, name="conv_final")(x)
    return keras.Model([bottleneck, *indices], outputs, name=DECODER_NAME)


def build_autoencoder(config=None, input_shape=None, name="autoencoder"):
    """Builds the SegNet S2SNet autoencoder (normalised image -> normalised image).

    Inputs whose height or width is not a multiple of 2**num_stages are padded
    (reflection by default) before the encoder and cropped back after the
    decoder, so the output always has the input's shape.

    Args:
      config: an `AutoencoderConfig` (default: the paper's full SegNet).
      input_shape: (H, W, C); H and W may be None (any size). Default
        (None, None, config.channels).
      name: model name.

    Returns:
      A functional `keras.Model` with nested "encoder" and "decoder" models.

    Raises:
      ValueError: for an invalid config, a channel count that disagrees with
        the config, or a static size too small to pad by reflection.
    """
    config = config or AutoencoderConfig()
    config.validate()
    input_shape = tuple(input_shape or (None, None, config.channels))
    if len(input_shape) != 3 or input_shape[-1] != config.channels:
        raise ValueError(
            f"input_shape must be (H, W, {config.channels}) for channels={config.channels}, "
            f"got {input_shape}"
        )
    multiple = 2 ** len(config.stages)
    padded = []
    for dim in input_shape[:2]:
        if dim is None:
            padded.append(None)
            continue
        if dim < 1:
            raise ValueError(f"input height/width must be positive, got {input_shape}")
        pad = (-dim) % multiple
        if config.pad_mode == "reflect" and pad >= dim:
            raise ValueError(
                f"input size {dim} is too small for {len(config.stages)} stages: reflection "
                f"padding to a multiple of {multiple} needs size > {pad}; use fewer stages"
            )
        padded.append(dim + pad)
    inputs = keras.Input(input_shape, name="image")
    x = s2s_layers.PadToMultiple(multiple, config.pad_mode, name="pad")(inputs)
    encoder = build_encoder(config, (*padded, config.channels))
    decoder = build_decoder(config, encoder)
    x = decoder(encoder(x))
    outputs = s2s_layers.CropLike(name="crop")([x, inputs])
    return keras.Model(inputs, outputs, name=name)


def get_encoder(autoencoder):
    """Returns the nested encoder model of an autoencoder from `build_autoencoder`."""
    return autoencoder.get_layer(ENCODER_NAME)


def get_decoder(autoencoder):
    """Returns the nested decoder model of an autoencoder from `build_autoencoder`."""
    return autoencoder.get_layer(DECODER_NAME)


def encoder_conv_layers(autoencoder):
    """The encoder's Conv2D layers in forward order."""
    return [
        layer for layer in get_encoder(autoencoder).layers if isinstance(layer, keras.layers.Conv2D)
    ]


def decoder_only_forward(autoencoder, x, training=False):
    """Runs the autoencoder with the encoder in inference mode and cut from the gradient.

    This is the authors' stage-2 forward pass: the encoder (BatchNorm
    statistics included) runs in inference mode and its outputs - bottleneck
    and pooling indices - pass through `stop_gradient`, so backpropagation
    touches only the decoder.

    Args:
      autoencoder: a model from `build_autoencoder`.
      x: normalised images [N, H, W, C].
      training: training mode of the decoder.

    Returns:
      The reconstruction, same shape as `x`.
    """
    pad = autoencoder.get_layer("pad")
    features = get_encoder(autoencoder)(pad(x), training=False)
    features = s2s_layers.StopGradient()(features)
    y = get_decoder(autoencoder)(features, training=training)
    return autoencoder.get_layer("crop")([y, x])
