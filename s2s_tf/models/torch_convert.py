"""Converts the authors' PyTorch S2SNet (SegNet) checkpoints into the Keras autoencoder.

The authors released PyTorch state dicts of their SegNet autoencoder
(spalaciob/s2snets-reconstruction, `models/segnet_autoencoder.py`);
`autoencoder.build_autoencoder` names its layers like their modules, so every
tensor maps by name:

    encoder.conv{s}{j}.weight [O, I, 3, 3]  -> encoder/conv{s}{j} kernel [3, 3, I, O]
    encoder.conv{s}{j}.bias                 -> encoder/conv{s}{j} bias
    encoder.bn{s}{j}.weight, bias,          -> encoder/bn{s}{j} gamma, beta,
      running_mean, running_var                  moving_mean, moving_variance
    decoder.conv{s}{j}d.*, bn{s}{j}d.*, conv_final.*: the same in the decoder

`.pth`/`.pt` files need PyTorch and are read with `torch.load(...,
weights_only=True)`, which unpickles only tensors and plain containers;
`.npz`/`.safetensors` exports of the same state dict need neither PyTorch nor
unpickling. The dict may sit under `model_state` or `state_dict`, keys may
carry DataParallel's `module.` prefix, and `num_batches_tracked` is ignored.
A missing, unexpected, mis-shaped, non-float or non-finite tensor fails with a
ValueError naming it, before any weight is assigned. Both models work on
ImageNet-normalised RGB in and out; `s2s_model` adds the normalisation.
"""

import collections
import os
import re
import tempfile

import keras
import numpy as np

from s2s_tf.models import autoencoder as ae_lib
from s2s_tf.models import checkpoint_files
from s2s_tf.models import s2s_model

CHECKPOINT_SUFFIXES = checkpoint_files.CHECKPOINT_SUFFIXES
# Entries of a training checkpoint that hold the model's state dict.
NESTED_KEYS = ("model_state", "state_dict")
# Leading key components of wrappers: DataParallel (`module.`), a composite
# holding the autoencoder (`segnet.`), or a flattened nested checkpoint.
CONTAINER_PREFIXES = ("module", "segnet", *NESTED_KEYS)
IGNORED_PARAMS = ("num_batches_tracked",)
CONV_PARAMS = ("weight", "bias")
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
_LAYER = re.compile(r"^(conv|bn)([1-9])([1-9])(d?)$")


def load_state_dict(path, skip_prefixes=()):
    """Reads a checkpoint file into a canonical state dict (see `canonical_state_dict`).

    Args:
      path: a `.pth`/`.pt` PyTorch file, or a `.npz`/`.safetensors` export.
      skip_prefixes: key prefixes of other models in the same file to ignore.

    Returns:
      A dict of canonical names (`encoder.conv11.weight`) to float32 arrays.

    Raises:
      FileNotFoundError: if `path` does not exist.
      ImportError: for a `.pth`/`.pt` file when PyTorch is not installed.
      ValueError: for an unknown suffix or any malformed content.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = checkpoint_files.read(path)
    try:
        return canonical_state_dict(raw, skip_prefixes)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def canonical_state_dict(state, skip_prefixes=()):
    """Validates a state dict and puts its keys in canonical form.

    Unwraps a `model_state`/`state_dict` entry, drops leading `module.` and
    `segnet.` components, gives bare keys (`conv11.weight`) their `encoder.` or
    `decoder.` part, drops `num_batches_tracked`, and converts every tensor
    (NumPy array or torch tensor) to float32.

    Args:
      state: a mapping of names to tensors, possibly nested as above.
      skip_prefixes: prefixes (after the container prefixes are dropped) of
        keys to ignore, e.g. ("resnet.",) for a classifier saved alongside.

    Returns:
      A dict of canonical names to float32 arrays, in the input's order.

    Raises:
      ValueError: naming the first key that is not a SegNet tensor, occurs
        twice, is not a tensor, is not floating point, or holds NaN/Inf.
    """
    if isinstance(skip_prefixes, str):
        skip_prefixes = (skip_prefixes,)
    state = _unnest(state)
    canonical, origin = {}, {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"a state dict has string keys, got {key!r}")
        stripped = _strip_containers(key)
        if any(stripped.startswith(p) for p in skip_prefixes):
            continue
        if stripped.rpartition(".")[2] in IGNORED_PARAMS:
            continue
        name = _canonical_name(stripped)
        if name is None:
            head = stripped.split(".")[0]
            hint = ""
            foreign = head not in ("encoder", "decoder", "conv_final") and not _LAYER.match(head)
            if "." in stripped and foreign:
                hint = f" (if it is another model's, skip the prefix: --skip_prefixes={head}.)"
            raise ValueError(f"unexpected tensor {key!r}: not a SegNet autoencoder tensor{hint}")
        if name in canonical:
            raise ValueError(f"tensor {name!r} occurs twice, as {origin[name]!r} and {key!r}")
        canonical[name] = _to_float32(key, value)
        origin[name] = key
    return canonical


def _unnest(state):
    for _ in range(len(NESTED_KEYS) + 1):
        if not hasattr(state, "items"):
            raise ValueError(
                f"expected a state dict (a mapping of tensor names to tensors), "
                f"got {type(state).__name__}"
            )
        inner = next((state[k] for k in NESTED_KEYS if k in state), None)
        if inner is None:
            return state
        state = inner
    return state


def _strip_containers(key):
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in CONTAINER_PREFIXES:
        parts.pop(0)
    return ".".join(parts)


def _canonical_name(key):
    """`encoder.conv11.weight` or `conv11.weight` -> `encoder.conv11.weight`; None if foreign."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] in ("encoder", "decoder"):
        part, layer, param = parts
    elif len(parts) == 2:
        part, (layer, param) = None, parts
    else:
        return None
    if layer == "conv_final":
        owner, params = "decoder", CONV_PARAMS
    else:
        match = _LAYER.match(layer)
        if not match:
            return None
        owner = "decoder" if match.group(4) else "encoder"
        params = CONV_PARAMS if match.group(1) == "conv" else BN_PARAMS
    if param not in params or part not in (None, owner):
        return None
    return f"{owner}.{layer}.{param}"


def _to_float32(key, value):
    if hasattr(value, "detach"):  # a torch tensor, e.g. from an in-memory state dict
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    if not isinstance(value, np.ndarray | np.generic):
        raise ValueError(f"tensor {key!r} is a {type(value).__name__}, not a tensor")
    value = np.asarray(value)
    if value.dtype.kind != "f":
        raise ValueError(f"tensor {key!r} has dtype {value.dtype}; expected floating point")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"tensor {key!r} holds NaN or Inf values")
    return value.astype(np.float32, copy=False)


def _torch_layout(autoencoder):
    """Yields (canonical name, Keras variable, PyTorch shape, to_keras) for every weight."""
    identity = lambda w: w  # noqa: E731
    oihw_to_hwio = lambda w: np.transpose(w, (2, 3, 1, 0))  # noqa: E731
    parts = (
        ("encoder", ae_lib.get_encoder(autoencoder)),
        ("decoder", ae_lib.get_decoder(autoencoder)),
    )
    for part, model in parts:
        for layer in model.layers:
            prefix = f"{part}.{layer.name}"
            if isinstance(layer, keras.layers.Conv2D):
                h, w, i, o = layer.kernel.shape
                yield f"{prefix}.weight", layer.kernel, (o, i, h, w), oihw_to_hwio
                yield f"{prefix}.bias", layer.bias, tuple(layer.bias.shape), identity
            elif isinstance(layer, keras.layers.BatchNormalization):
                pairs = zip(
                    BN_PARAMS,
                    (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
                    strict=True,
                )
                for param, variable in pairs:
                    yield f"{prefix}.{param}", variable, tuple(variable.shape), identity


def convert_state_dict(state, autoencoder):
    """Assigns the authors' state dict to an autoencoder from `build_autoencoder`.

    Every check runs before the first assignment, so a failure leaves the
    model untouched.

    Args:
      state: a state dict (raw or canonical, see `canonical_state_dict`).
      autoencoder: the Keras model to fill; its widths must match.

    Raises:
      ValueError: naming the first missing (model order), mis-shaped or
        unexpected tensor, or any problem `canonical_state_dict` finds.
    """
    state = canonical_state_dict(state)
    layout = list(_torch_layout(autoencoder))
    values = []
    for name, variable, shape, to_keras in layout:
        if name not in state:
            raise ValueError(f"missing tensor {name!r} (expected shape {shape})")
        if state[name].shape != shape:
            raise ValueError(
                f"tensor {name!r} has shape {state[name].shape}, the autoencoder needs {shape}"
            )
        values.append((variable, to_keras(state[name])))
    expected = {name for name, *_ in layout}
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise ValueError(
            f"unexpected tensor {unexpected[0]!r}: the autoencoder has no such weight "
            f"({len(unexpected)} unexpected in all)"
        )
    for variable, value in values:
        variable.assign(value)


def config_from_state_dict(state, **overrides):
    """Infers the autoencoder's shape from the encoder's conv weights.

    Args:
      state: a state dict (raw or canonical).
      **overrides: other `AutoencoderConfig` fields (e.g. pool_impl).

    Returns:
      An `AutoencoderConfig` whose `stage_widths` and `channels` match the
      checkpoint (the paper's VGG16 widths for the released weights).

    Raises:
      ValueError: if `encoder.conv11.weight` is missing or a conv weight is not 4-D.
    """
    state = canonical_state_dict(state)
    stages = []
    for s in range(1, 10):
        widths = []
        for j in range(1, 10):
            weight = state.get(f"encoder.conv{s}{j}.weight")
            if weight is None:
                break
            if weight.ndim != 4:
                raise ValueError(
                    f"tensor 'encoder.conv{s}{j}.weight' has shape {weight.shape}; "
                    "expected a 4-D [out, in, 3, 3] conv kernel"
                )
            # The width most of the layer's tensors agree on, so the error names
            # the one tensor that is mis-shaped rather than its neighbours.
            norms = [state.get(f"encoder.bn{s}{j}.{p}") for p in BN_PARAMS]
            votes = [weight.shape[0]] + [v.shape[0] for v in norms if v is not None and v.ndim == 1]
            widths.append(int(collections.Counter(votes).most_common(1)[0][0]))
        if not widths:
            break
        stages.append(tuple(widths))
    if not stages:
        raise ValueError("missing tensor 'encoder.conv11.weight' (the first encoder conv)")
    # The output channels of conv_final, if present, so that a transposed conv11
    # kernel is reported as mis-shaped rather than changing the model.
    final = state.get("decoder.conv_final.weight")
    if final is not None and final.ndim == 4:
        channels = int(final.shape[0])
    else:
        channels = int(state["encoder.conv11.weight"].shape[1])
    return ae_lib.AutoencoderConfig(stage_widths=tuple(stages), channels=channels, **overrides)


def autoencoder_from_state_dict(state, input_shape=None, **overrides):
    """Builds the matching Keras autoencoder and fills it with the state dict.

    Args:
      state: a state dict (raw or canonical).
      input_shape: (H, W) or (H, W, C) to fix the input size; default any size.
      **overrides: other `AutoencoderConfig` fields (e.g. pool_impl).

    Returns:
      The `keras.Model` from `build_autoencoder` with the converted weights.
    """
    state = canonical_state_dict(state)
    config = config_from_state_dict(state, **overrides)
    if input_shape is not None and len(input_shape) == 2:
        input_shape = (*input_shape, config.channels)
    model = ae_lib.build_autoencoder(config, input_shape)
    convert_state_dict(state, model)
    return model


def load_autoencoder(path, input_shape=None, skip_prefixes=(), **overrides):
    """Loads a `.keras` autoencoder, or converts a checkpoint file in memory.

    The entry point for options such as `--init_from` that take both the
    converter's output and the authors' checkpoints.

    Args:
      path: a `.keras` autoencoder, or a file with one of `CHECKPOINT_SUFFIXES`.
      input_shape: (H, W) or (H, W, C) for a checkpoint; default any size.
      skip_prefixes: key prefixes of other models in a checkpoint to ignore.
      **overrides: other `AutoencoderConfig` fields for a checkpoint (e.g. pool_impl).

    Returns:
      A `keras.Model`, ImageNet-normalised images in and out.

    Raises:
      FileNotFoundError, ImportError, ValueError: as `load_state_dict`, with
        ValueErrors of the conversion prefixed by the path.
    """
    path = os.fspath(path)
    if path.endswith(".keras"):
        return s2s_model.load_keras(path, "autoencoder")
    state = load_state_dict(path, skip_prefixes)
    try:
        return autoencoder_from_state_dict(state, input_shape, **overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def convert_file(path, out_path, input_shape=None, skip_prefixes=(), **overrides):
    """Converts a checkpoint file into a `.keras` autoencoder, written atomically.

    Args:
      path: the checkpoint (`CHECKPOINT_SUFFIXES`).
      out_path: the `.keras` file; written under a temporary name and renamed,
        so it appears complete or not at all.
      input_shape, skip_prefixes, **overrides: as `load_autoencoder`.

    Returns:
      The converted `keras.Model`.
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith(".keras") or os.fspath(path).endswith(".keras"):
        raise ValueError(f"convert a checkpoint into a .keras file, not {path} into {out_path}")
    model = load_autoencoder(path, input_shape, skip_prefixes, **overrides)
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".partial.keras", dir=directory)
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return model
