"""The .pth reader against crafted files: no code runs, no foreign memory is read, no crash.

Every file here is built with pickle, struct and zipfile only (no torch),
mimicking what ``torch.save`` writes byte for byte where it matters.
"""

import collections
import io
import itertools
import math
import pickle
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cnnkit.backbones import efficientnet_lite
from cnnkit.backbones.torch_legacy import read_state_dict
from cnnkit.cli import app
from cnnkit.errors import CnnkitError
from conftest import PHOTOS

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
STORAGE_TYPES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


class Global:
    """Pickles as ``GLOBAL module name`` without importing anything (torch is absent)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists a reduce function be callable
        raise AssertionError("never called")


class Storage:
    """A storage; ``numel`` may claim more elements than ``array`` holds."""

    def __init__(self, key, array, legacy=True, numel=None):
        self.key, self.array, self.legacy = key, array, legacy
        self.numel = array.size if numel is None else numel


class Pid:
    """Pickles as exactly this persistent id."""

    def __init__(self, pid):
        self.pid = pid


class Tensor:
    """A tensor as torch pickles it: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return Global("torch._utils", "_rebuild_tensor_v2"), self.args


class Payload:
    """Code a plain unpickler would run: it creates ``marker``."""

    def __init__(self, marker, how="open"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return Global("os", "system"), (f"touch '{self.marker}'",)
        return Global("builtins", "open"), (self.marker, "w")


class Pickler(pickle._Pickler):  # the Python pickler, so save() can be overridden
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, Pid):
            return obj.pid
        if isinstance(obj, Storage):
            pid = ("storage", Global("torch", STORAGE_TYPES[obj.array.dtype]), obj.key, "cpu", obj.numel)
            return pid + (None,) if obj.legacy else pid
        return None


def dumps(obj) -> bytes:
    out = io.BytesIO()
    Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def legacy_bytes(state, storages, header=(MAGIC, 1001, SYS_INFO), keys=None, counts=None):
    """A legacy .pth: five pickles, then each storage as count + raw bytes."""
    keys = list(storages) if keys is None else keys
    parts = [dumps(obj) for obj in header] + [dumps(state), dumps(keys)]
    for key in keys:
        if key not in storages:  # a crafted key list; the reader must refuse before the data
            continue
        array = storages[key].array
        count = storages[key].numel if counts is None else counts.get(key, storages[key].numel)
        parts += [struct.pack("<q", count), array.tobytes()]
    return b"".join(parts)


def zip_bytes(state, storages, root="archive"):
    """A zip-format .pth as torch.save writes it: stored members under one folder."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{root}/data.pkl", dumps(state))
        archive.writestr(f"{root}/byteorder", "little")
        for key, storage in storages.items():
            archive.writestr(f"{root}/data/{key}", storage.array.tobytes())
        archive.writestr(f"{root}/version", "3\n")
    return out.getvalue()


def sample(legacy=True):
    """A small state dict with a transposed view, an offset into a shared storage and a 0-d tensor."""
    a = Storage("0", np.arange(12, dtype=np.float32) * 1.5, legacy)
    b = Storage("1", np.array([7], dtype=np.int64), legacy)
    state = collections.OrderedDict([
        ("w", Tensor(a, 0, (3, 4), (4, 1))),     # the whole storage, row-major
        ("w_t", Tensor(a, 0, (4, 3), (1, 4))),   # its transpose: non-contiguous strides
        ("tail", Tensor(a, 8, (2, 2), (2, 1))),  # an offset into the same storage
        ("count", Tensor(b, 0, (), ())),         # 0-d, like BatchNorm's num_batches_tracked
    ])
    expected = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) * 1.5}
    expected["w_t"] = expected["w"].T
    expected["tail"] = (np.arange(8, 12, dtype=np.float32) * 1.5).reshape(2, 2)
    expected["count"] = np.array(7, dtype=np.int64)
    return state, {"0": a, "1": b}, expected


def write(tmp_path, data, name="crafted.pth"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_same(tensors, expected):
    assert tensors.keys() == expected.keys()
    for name, array in expected.items():
        assert tensors[name].dtype == array.dtype and tensors[name].shape == array.shape, name
        np.testing.assert_array_equal(tensors[name], array)


# --- valid files -------------------------------------------------------------

def test_a_small_legacy_file_round_trips_exact_values(tmp_path):
    state, storages, expected = sample()
    tensors = read_state_dict(write(tmp_path, legacy_bytes(state, storages)))
    assert_same(tensors, expected)
    assert not np.shares_memory(tensors["w"], tensors["w_t"])  # copies, not views of the file


@pytest.mark.parametrize("root", ["archive", "my_model"])
def test_a_small_zip_format_file_round_trips_exact_values(tmp_path, root):
    state, storages, expected = sample(legacy=False)
    assert_same(read_state_dict(write(tmp_path, zip_bytes(state, storages, root))), expected)


def test_empty_tensors_are_read(tmp_path):
    s = Storage("0", np.zeros(0, dtype=np.float32))
    state = {"empty": Tensor(s, 0, (0, 5), (5, 1))}
    assert read_state_dict(write(tmp_path, legacy_bytes(state, {"0": s})))["empty"].shape == (0, 5)


# --- code payloads -----------------------------------------------------------

POSITIONS = ["magic-number", "protocol-version", "system-info", "state-dict", "storage-key"]


def payload_file(tmp_path, position, how="open"):
    marker = tmp_path / "owned"
    state, storages, _ = sample()
    header = [MAGIC, 1001, SYS_INFO]
    keys = list(storages)
    if position in POSITIONS[:3]:
        header[POSITIONS.index(position)] = Payload(marker, how)
    elif position == "state-dict":
        state["evil"] = Payload(marker, how)
    else:
        keys = [keys[0], Payload(marker, how)]
    data = b"".join([dumps(obj) for obj in header] + [dumps(state), dumps(keys)])
    return write(tmp_path, data + b"\0" * 64), marker


@pytest.mark.parametrize("how", ["open", "system"])
@pytest.mark.parametrize("position", POSITIONS)
def test_a_payload_in_any_of_the_five_pickles_is_refused(tmp_path, position, how):
    path, marker = payload_file(tmp_path, position, how)
    name = "builtins.open" if how == "open" else "os.system"
    with pytest.raises(CnnkitError) as error:
        read_state_dict(path)
    assert str(error.value) == (f"{path}: not a safe PyTorch state dict "
                                f"(refusing global {name} in the {position} pickle)")
    assert not marker.exists()


def test_refuses_pickles_that_would_run_code(tmp_path):
    """The original planted-payload test (moved from test_efficientnet_lite.py)."""
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"x": Evil()}):
            pickle.dump(obj, handle, protocol=2)
    with pytest.raises(CnnkitError, match=r"refusing global (__builtin__|builtins)\.print"):
        read_state_dict(path)


def test_a_payload_in_a_zip_format_file_is_refused(tmp_path):
    marker = tmp_path / "owned"
    state, storages, _ = sample(legacy=False)
    state["evil"] = Payload(marker)
    path = write(tmp_path, zip_bytes(state, storages))
    with pytest.raises(CnnkitError, match="refusing global builtins.open in the state-dict pickle"):
        read_state_dict(path)
    assert not marker.exists()


def test_persistent_ids_and_unknown_torch_names_are_refused(tmp_path):
    state, storages, _ = sample()
    header_pid = legacy_bytes(state, storages, header=(MAGIC, 1001, Pid(("storage", "x"))))
    with pytest.raises(CnnkitError, match="refusing a persistent id in the system-info pickle"):
        read_state_dict(write(tmp_path, header_pid))
    state["p"] = Global("torch.nn.parameter", "Parameter")
    with pytest.raises(CnnkitError, match="refusing global torch.nn.parameter.Parameter"):
        read_state_dict(write(tmp_path, legacy_bytes(state, storages)))


# --- crafted geometry and storages -------------------------------------------

def crafted(tensor=None, keys=None, counts=None, header=None, cut=0):
    """The sample file with one thing changed."""
    state, storages, _ = sample()
    if tensor is not None:
        state["bad"] = tensor(storages)
    data = legacy_bytes(state, storages, header or (MAGIC, 1001, SYS_INFO), keys, counts)
    return data[:len(data) - cut]


CRAFTED = {
    "stride past storage": (crafted(lambda s: Tensor(s["0"], 0, (2, 3), (1, 1 << 40))),
                            r"tensor bad reaches element 2199023255553 of storage 0, which has 12 "
                            r"\(offset 0, sizes \(2, 3\), strides \(1, 1099511627776\)\)"),
    "offset past storage": (crafted(lambda s: Tensor(s["0"], 1000, (2,), (1,))),
                            r"tensor bad reaches element 1001 of storage 0, which has 12"),
    "one element too far": (crafted(lambda s: Tensor(s["0"], 0, (3, 5), (4, 1))),
                            r"reaches element 12 of storage 0, which has 12"),
    "empty tensor offset past end": (crafted(lambda s: Tensor(s["0"], 13, (0,), (1,))),
                                     r"empty tensor with offset 13"),
    "negative size": (crafted(lambda s: Tensor(s["0"], 0, (-1, 2), (1, 1))), r"bad sizes"),
    "negative stride": (crafted(lambda s: Tensor(s["0"], 11, (3,), (-1,))), r"bad sizes"),
    "negative offset": (crafted(lambda s: Tensor(s["0"], -4, (2,), (1,))), r"bad storage offset -4"),
    "float size": (crafted(lambda s: Tensor(s["0"], 0, (2.0,), (1,))), r"bad sizes"),
    "string stride": (crafted(lambda s: Tensor(s["0"], 0, (2,), ("1",))), r"bad sizes"),
    "bool offset": (crafted(lambda s: Tensor(s["0"], True, (2,), (1,))), r"bad storage offset"),
    "size and stride lengths differ": (crafted(lambda s: Tensor(s["0"], 0, (2, 2), (1,))), r"bad sizes"),
    "list sizes": (crafted(lambda s: Tensor(s["0"], 0, [2], [1])), r"bad sizes"),
    "broadcast view": (crafted(lambda s: Tensor(s["0"], 0, (10**6,), (0,))),
                       r"tensor bad has 1000000 elements but its storage only 12"),
    "no storage": (crafted(lambda s: Tensor("0", 0, (2,), (1,))), r"tensor bad has no storage"),
    "storage count larger than the file": (
        crafted(lambda s: Tensor(s.setdefault("2", Storage("2", np.zeros(1, np.float32), numel=10**15)),
                                 0, (2,), (1,))),
        r"truncated \(storage 2 declares 1000000000000000 elements, 4000000000000000 bytes, but 4 bytes"),
    "storage count differs from its reference": (crafted(counts={"1": 10**15}),
                                                 r"storage 1 holds 1000000000000000 elements, its reference says 1"),
    "truncated storage": (crafted(cut=4), r"truncated \(storage 1 declares 1 elements, 8 bytes, but 4 bytes"),
    "truncated count": (crafted(cut=12), r"truncated \(the file ends before storage 1\)"),
    "duplicated storage keys": (crafted(keys=["0", "1", "1"]), r"the storage-key list repeats a key"),
    "tensor naming a missing storage": (crafted(keys=["0"]), r"the storage-key list lacks storage 1"),
    "key list naming an unused storage": (crafted(keys=["0", "1", "x"]), r"lists storages no tensor uses"),
    "key list of ints": (crafted(keys=[0, 1]), r"not a list of strings"),
    "bad magic": (crafted(header=(12345, 1001, SYS_INFO)), r"bad magic number"),
    "bool magic": (crafted(header=(True, 1001, SYS_INFO)), r"bad magic number"),
    "big endian": (crafted(header=(MAGIC, 1001, {"little_endian": False})), r"only little-endian"),
    "float as sys info": (crafted(header=(MAGIC, 1001, 1.5)), r"unsupported system info"),
    "set as sys info": (crafted(header=(MAGIC, 1001, {1, 2})), r"refusing global __builtin__.set in the system"),
    "not a pickle": (b"hello, world" * 10, r"not a PyTorch weights file \(neither the zip nor the legacy format\)"),
    "a pickle cut short": (crafted()[:5], r"malformed magic-number pickle \(ValueError: not enough data in stream to read long1\)"),
    "empty file": (b"", r"empty file"),
    "memo index far past the pickle": (crafted()[:2] + b"K\x01r\xff\xff\xff\x7f." + crafted()[2:],
                                       r"malformed magic-number pickle \(UnpicklingError: memo index 2147483647 out of range\)"),
    "protocol-5 bytearray": (b"\x80\x05\x96" + struct.pack("<Q", 3) + b"abc." + crafted(),
                             r"malformed magic-number pickle \(UnpicklingError: refusing opcode BYTEARRAY8"),
    "length past the end": (b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"." + crafted(),
                            r"expected 1099511627776 bytes in a bytearray8, but only 718 remain"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_legacy_files_are_refused_naming_the_file(tmp_path, case):
    data, message = CRAFTED[case]
    path = write(tmp_path, data)
    with pytest.raises(CnnkitError, match=message) as error:
        read_state_dict(path)
    assert str(error.value).startswith(f"{path}: ")
    assert "\n" not in str(error.value)


def test_a_storage_with_two_types_is_refused(tmp_path):
    state, storages, _ = sample()
    alias = Storage("0", np.zeros(12, dtype=np.int64))  # same key, other type
    state["alias"] = Tensor(alias, 0, (2,), (1,))
    with pytest.raises(CnnkitError, match="storage 0 is referenced with two different types or sizes"):
        read_state_dict(write(tmp_path, legacy_bytes(state, storages)))


def test_many_views_of_one_storage_cannot_exhaust_memory(tmp_path):
    s = Storage("0", np.zeros(1000, dtype=np.float32))
    state = {f"v{i}": Tensor(s, 0, (1000,), (1,)) for i in range(100)}
    with pytest.raises(CnnkitError, match="view the storages far more often"):
        read_state_dict(write(tmp_path, legacy_bytes(state, {"0": s})))


def test_markup_and_newlines_from_the_file_do_not_reach_the_message(tmp_path):
    state, storages, _ = sample()
    state["[/red]\nx"] = Tensor(storages["0"], 99, (1,), (1,))
    with pytest.raises(CnnkitError) as error:
        read_state_dict(write(tmp_path, legacy_bytes(state, storages)))
    assert "tensor ?/red??x reaches" in str(error.value)


def zip_with(tmp_path, edit):
    """The sample zip file rewritten member by member through ``edit(name, bytes) -> bytes | None``."""
    state, storages, _ = sample(legacy=False)
    source = zipfile.ZipFile(io.BytesIO(zip_bytes(state, storages)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for info in source.infolist():
            data = edit(info, source.read(info))
            if data is not None:
                archive.writestr(info, data)
    return write(tmp_path, out.getvalue())


@pytest.mark.parametrize("edit, message", [
    (lambda info, d: d[:-4] if info.filename == "archive/data/0" else d,
     r"zip member archive/data/0 has 44 bytes, expected 48"),
    (lambda info, d: None if info.filename == "archive/data/1" else d, r"the zip has no member archive/data/1"),
    (lambda info, d: None if info.filename.endswith("data.pkl") else d, r"not a PyTorch zip-format .pth"),
    (lambda info, d: b"big" if info.filename.endswith("byteorder") else d, r"big-endian"),
    (lambda info, d: (setattr(info, "compress_type", zipfile.ZIP_DEFLATED), d)[1],
     r"is compressed; PyTorch stores its members uncompressed"),
])
def test_crafted_zip_files_are_refused(tmp_path, edit, message):
    with pytest.raises(CnnkitError, match=message):
        read_state_dict(zip_with(tmp_path, edit))


def test_a_zip_with_a_bad_crc_is_refused(tmp_path):
    state, storages, _ = sample(legacy=False)
    data = zip_bytes(state, storages)
    at = data.index(storages["0"].array.tobytes())
    data = data[:at] + b"\xff" + data[at + 1:]
    with pytest.raises(CnnkitError, match=r"damaged zip member archive/data/0 \(Bad CRC-32"):
        read_state_dict(write(tmp_path, data))


def test_other_paths_are_refused(tmp_path):
    with pytest.raises(CnnkitError, match="cannot read"):
        read_state_dict(tmp_path)
    with pytest.raises(CnnkitError, match="cannot read"):
        read_state_dict(tmp_path / "missing.pth")


# --- fuzzing -----------------------------------------------------------------

VALID_LEGACY = legacy_bytes(*sample()[:2])
VALID_ZIP = zip_bytes(*sample(legacy=False)[:2])

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
)


def mutate(data: bytes, mutations) -> bytes:
    for kind, where, what in mutations:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ what]) + data[at + 1:]
        elif kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data = data[:at] + what + data[at:]
    return data


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pickletools")  # odd escapes in mutated strings
@pytest.mark.parametrize("valid", [VALID_LEGACY, VALID_ZIP], ids=["legacy", "zip"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_files_give_arrays_or_a_cnnkit_error(tmp_path, valid, mutations):
    path = write(tmp_path, mutate(valid, mutations))
    try:
        tensors = read_state_dict(path)
    except CnnkitError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        return
    assert all(isinstance(t, np.ndarray) for t in tensors.values())


small_int = st.one_of(st.integers(-2, 30), st.sampled_from([2**31, 2**62, 2**63, 2**64]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=small_int, size=st.lists(small_int, max_size=3), stride=st.lists(small_int, max_size=3))
def test_any_tensor_geometry_reads_exactly_its_elements_or_is_refused(tmp_path, offset, size, stride):
    """Against a plain-Python gather: in-bounds views give exactly those values, the rest a CnnkitError."""
    storage = Storage("0", np.arange(24, dtype=np.float32))
    path = write(tmp_path, legacy_bytes({"t": Tensor(storage, offset, tuple(size), tuple(stride))}, {"0": storage}))
    ints_ok = all(0 <= v < 2**63 for v in [offset, *size, *stride]) and len(size) == len(stride)
    if ints_ok and math.prod(size) == 0:  # empty: nothing read; the shape must stay representable
        indexes, fits = [], offset <= 24 and math.prod(v for v in size if v) <= 2**48
    elif ints_ok and math.prod(size) <= 24:  # never more elements than the storage
        indexes = [offset + sum(i * s for i, s in zip(at, stride)) for at in itertools.product(*map(range, size))]
        fits = all(i < 24 for i in indexes)
    else:
        fits = False
    if not fits:
        with pytest.raises(CnnkitError):
            read_state_dict(path)
        return
    got = read_state_dict(path)["t"]
    assert got.shape == tuple(size) and got.ravel().tolist() == [float(i) for i in indexes]


# --- the command line --------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize("case", [f"payload in {p}" for p in POSITIONS] + [
    "stride past storage", "offset past storage", "storage count larger than the file",
    "tensor naming a missing storage", "zip payload"])
def test_predict_with_crafted_weights_exits_2_with_one_line(tmp_path, case):
    marker = tmp_path / "owned"
    if case.startswith("payload in "):
        path, marker = payload_file(tmp_path, case.removeprefix("payload in "))
    elif case == "zip payload":
        state, storages, _ = sample(legacy=False)
        state["evil"] = Payload(marker)
        path = write(tmp_path, zip_bytes(state, storages))
    else:
        path = write(tmp_path, CRAFTED[case][0])
    result = runner.invoke(app, ["predict", "--weights", str(path), str(PHOTOS / "cat.png")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not marker.exists()


def state_dict_file(tmp_path, arrays, name="lite.pth"):
    """A legacy .pth holding ``arrays`` (contiguous), e.g. a real state dict edited."""
    storages, state = {}, collections.OrderedDict()
    for i, (key, array) in enumerate(arrays.items()):
        storages[str(i)] = Storage(str(i), np.ascontiguousarray(array).ravel())
        state[key] = Tensor(storages[str(i)], 0, array.shape,
                            tuple(s // array.itemsize for s in array.strides))
    return write(tmp_path, legacy_bytes(state, storages), name)


@pytest.mark.slow
def test_real_weights_edited_give_one_line_errors_through_the_cli(tmp_path):
    real = read_state_dict(efficientnet_lite.package_weights_file("efficientnet_lite0"))
    missing = {k: v for k, v in real.items() if k != "_bn0.bias"}
    flat = dict(real, **{"_conv_stem.weight": real["_conv_stem.weight"].ravel()})
    reshaped = dict(real, **{"_bn0.bias": np.zeros(33, np.float32)})
    converted = efficientnet_lite.load_converted("efficientnet_lite0")
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, **{k: v for k, v in converted.items() if k != "stem_bn/1"})
    shaped_npz = tmp_path / "shaped.npz"
    np.savez(shaped_npz, **dict(converted, **{"stem_bn/1": np.zeros(3, np.float32)}))
    not_npz = write(tmp_path, b"not a zip", "garbage.npz")
    cases = {
        state_dict_file(tmp_path, missing, "missing.pth"): "lack tensor '_bn0.bias'",
        state_dict_file(tmp_path, flat, "flat.pth"): "tensor of the wrong shape",
        state_dict_file(tmp_path, reshaped, "reshaped.pth"): "layer stem_bn of efficientnet_lite0 needs shapes",
        bad_npz: "lacks array 'stem_bn/1'",
        shaped_npz: "layer stem_bn of efficientnet_lite0 needs shapes",
        not_npz: "not a readable weights .npz (ValueError)",
    }
    for path, message in cases.items():
        result = runner.invoke(app, ["predict", "--weights", str(path), str(PHOTOS / "cat.png")])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and message in lines[0], result.stderr


@pytest.mark.slow
def test_real_weights_rewritten_by_the_test_writer_predict_a_cat(tmp_path):
    """The packaged file, read, rewritten as a legacy file and as a zip, reads back identically
    and still classifies the cat -- the crafted-file writer above mimics the real layout."""
    real = read_state_dict(efficientnet_lite.package_weights_file("efficientnet_lite0"))
    assert real["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert real["_bn0.num_batches_tracked"].shape == () and real["_fc.weight"].shape == (1000, 1280)
    legacy = state_dict_file(tmp_path, real)
    assert_same(read_state_dict(legacy), real)
    result = runner.invoke(app, ["predict", "--weights", str(legacy), str(PHOTOS / "cat.png"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"tabby"' in result.stdout or '"tiger cat"' in result.stdout or '"Egyptian cat"' in result.stdout
