"""Read a legacy-format PyTorch ``.pth`` state dict with pickle and numpy only.

The legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``)
is a sequence of pickles -- magic number, protocol version, system info, the
state dict, the list of storage keys -- followed by each storage's raw bytes,
preceded by its element count as an 8-byte little-endian integer. Tensors in
the state dict point at storages by key through pickle's persistent ids.

The unpickler resolves only the handful of names a state dict uses and
refuses every other global, so a crafted file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _TensorRef:
    """A tensor as the state dict describes it, before its storage is read."""

    def __init__(self, storage, offset, size, stride):
        self.storage_key = storage[2]
        self.dtype = _STORAGE_DTYPES[storage[1]]
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorRef(storage, storage_offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a state dict")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return pid


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a legacy PyTorch state dict as ``{name: numpy array}``.

    Raises:
        CnnkitError: the file is not a legacy-format state dict.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            magic = pickle.load(handle)
            if magic != _MAGIC_NUMBER:
                raise CnnkitError(f"{path}: not a legacy PyTorch file (bad magic number)")
            if pickle.load(handle) != _PROTOCOL_VERSION:
                raise CnnkitError(f"{path}: unsupported PyTorch protocol version")
            sys_info = pickle.load(handle)
            if not sys_info.get("little_endian", True):
                raise CnnkitError(f"{path}: big-endian PyTorch files are not supported")
            refs = _StateDictUnpickler(handle).load()
            storage_keys = pickle.load(handle)
            storages: dict[str, np.ndarray] = {}
            dtype_of = {ref.storage_key: ref.dtype for ref in refs.values() if isinstance(ref, _TensorRef)}
            for key in storage_keys:
                count = int.from_bytes(handle.read(8), "little")
                dtype = np.dtype(dtype_of.get(key, np.uint8))
                data = handle.read(count * dtype.itemsize)
                if len(data) != count * dtype.itemsize:
                    raise CnnkitError(f"{path}: truncated (storage {key} is short)")
                storages[key] = np.frombuffer(data, dtype=dtype)
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError) as error:
        raise CnnkitError(f"{path}: not a readable PyTorch state dict ({error})") from None

    tensors: dict[str, np.ndarray] = {}
    for name, ref in refs.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = storages[ref.storage_key]
        itemsize = flat.dtype.itemsize
        array = np.lib.stride_tricks.as_strided(
            flat[ref.offset:],
            shape=ref.size,
            strides=tuple(s * itemsize for s in ref.stride),
            writeable=False,
        )
        tensors[name] = np.array(array)  # own the memory, contiguous
    return tensors
