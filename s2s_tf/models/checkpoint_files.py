"""Reads checkpoint files of a PyTorch state dict into NumPy arrays, safely.

`.pth`/`.pt` files need PyTorch and are read with `torch.load(...,
weights_only=True)`, which unpickles only tensors and plain containers; `.npz`
files are read with `allow_pickle=False`; `.safetensors` files are parsed as
raw buffers by NumPy alone. Nothing here ever unpickles arbitrary objects.
`s2s_tf.models.torch_convert` turns the result into the Keras autoencoder.
"""

import json
import os
import pickle

import numpy as np

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".npz", ".safetensors")
TORCH_SUFFIXES = (".pth", ".pt")
# safetensors dtype names -> NumPy dtypes (little-endian); BF16 is widened by hand.
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8"}
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def read(path):
    """Reads a checkpoint file as it is stored (a possibly nested dict of arrays/tensors).

    Raises:
      ImportError: for a `.pth`/`.pt` file when PyTorch is not installed.
      ValueError: for an unknown suffix or a malformed file.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".safetensors":
        return read_safetensors(path)
    raise ValueError(
        f"{path}: unknown checkpoint type {suffix!r}; use one of {', '.join(CHECKPOINT_SUFFIXES)}"
    )


def _read_torch(path):
    try:
        import torch  # optional: only .pth/.pt files need it
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch; the CPU build is enough), "
            "or export the state dict to .npz/.safetensors where PyTorch is installed"
        ) from e
    try:
        # weights_only=True: only tensors and plain containers are unpickled, never
        # arbitrary Python objects (a plain torch.load can run code from the file).
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: not a plain state dict: torch.load(weights_only=True) refused it "
            f"({first}); save model.state_dict() instead of a pickled model or object"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from None


def _read_npz(path):
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = str(e)
        if "pickled" in reason:
            reason = "NumPy could read it only by unpickling, which this converter never does"
        raise ValueError(f"{path}: not an .npz archive of arrays ({reason})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single .npy array, not an .npz archive of a state dict")
    with data:
        state = {}
        for key in data.files:
            try:
                state[key] = data[key]
            except ValueError as e:
                raise ValueError(
                    f"{path}: array {key!r} holds pickled Python objects (an object array), "
                    f"which are never loaded; store plain numeric arrays ({e})"
                ) from None
        return state


def read_safetensors(path):
    """Reads a `.safetensors` file with NumPy alone (no `safetensors` package needed).

    The format: an 8-byte little-endian length N, N bytes of JSON mapping each
    name to {"dtype", "shape", "data_offsets": [begin, end]} (into the byte
    buffer that follows) plus an optional "__metadata__"; BF16 becomes float32.

    Returns:
      A dict of names to NumPy arrays, in header order.

    Raises:
      ValueError: for a malformed header, an unknown dtype or bad offsets.
    """
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    size = int(np.frombuffer(blob[:8], "<u8")[0])
    if size > min(len(blob) - 8, _MAX_SAFETENSORS_HEADER):
        raise ValueError(f"{path}: not a safetensors file (header length {size} is impossible)")
    try:
        header = json.loads(blob[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is not a JSON object)")
    buffer = memoryview(blob)[8 + size :]
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__":
            tensors[name] = _safetensors_array(path, name, info, buffer)
    return tensors


def _safetensors_array(path, name, info, buffer):
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(d) for d in shape)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
    if dtype_name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= begin <= end <= len(buffer) or end - begin != expected:
        raise ValueError(
            f"{path}: tensor {name!r} has data offsets [{begin}, {end}] that do not hold "
            f"{shape} {dtype_name} values in a {len(buffer)}-byte buffer"
        )
    array = np.frombuffer(buffer[begin:end], dtype).reshape(shape)
    if dtype_name == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.copy()
