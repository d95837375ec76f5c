"""A torch-free, restricted reader and a writer of PyTorch ``.pth`` checkpoints.

The format (``torch.save`` since PyTorch 1.6, "zip serialization") is a zip archive with
one top folder ``<name>/`` (the file stem in older versions, ``archive`` in newer ones):

- ``<name>/data.pkl``: a protocol-2 pickle of the saved object. Tensors appear as calls
  ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
  backward_hooks[, metadata])``; each ``storage`` is a *persistent id*
  ``('storage', torch.<Type>Storage, key, location, numel)``.
- ``<name>/data/<key>``: the raw bytes of storage ``key`` (numel * itemsize bytes).
- ``<name>/version`` (and/or ``<name>/.data/version``): the format version ("3").
- ``<name>/byteorder`` (newer versions): "little" or "big"; little when absent.

Reading never runs code from the file: the unpickler resolves only the tensor-rebuild
function, the storage types listed in :data:`STORAGE_DTYPES`, ``collections.OrderedDict``
and ``set`` / ``frozenset``; every other global (``os.system``, ``builtins.eval``, a
``torch.nn`` class, a numpy scalar, ...) stops the load with :class:`CheckpointError`
naming it. Plain containers and numbers need no global and load as usual. Tensors come
back as C-contiguous numpy arrays (views / strides / offsets into a shared storage are
resolved and bounds-checked).

The legacy format of PyTorch < 1.6 (a sequence of pickles, no zip) and the older tar
format are detected and refused with a message that says how to re-save the file.

:func:`save_pth` writes the same zip format from numpy arrays (for tests and for
producing released-format files without torch); :class:`StridedTensor` writes a view
into a shared storage.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Mapping
from zlib import error as zlib_error

import numpy as np

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_TO_STORAGE = {v: k for k, v in STORAGE_DTYPES.items()}

# torch.serialization's magic number of the legacy (pre-1.6) format, pickled as LONG1.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")

# Keys under which checkpoints commonly keep the model's state dict, in lookup order.
# The released DKNet code saves {'model': state_dict, 'optimizer': ...} (utils/utils.py).
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "net", "network", "model_state")

_RESAVE_HINT = (
    "re-save it in the zip format with PyTorch >= 1.6: "
    "python -c \"import torch; torch.save(torch.load('OLD.pth', map_location='cpu'), "
    "'NEW.pth')\""
)


class CheckpointError(ValueError):
    """The file is not a readable, safe PyTorch zip checkpoint (the message says why)."""


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<name>`` storage classes inside the pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True, eq=False)
class _Storage:
    key: str
    data: np.ndarray  # 1-D, native byte order


def _check_int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(
            f"tensor record: {what} must be an integer >= {minimum}, got {value!r}"
        )
    return value


def _rebuild_tensor(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """Our stand-in for ``torch._utils._rebuild_tensor_v2``: a bounds-checked copy."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor record: expected a storage, got {type(storage).__name__}")
    offset = _check_int(storage_offset, "storage_offset")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise CheckpointError(
            f"tensor record: size and stride must be tuples, got {size!r}, {stride!r}"
        )
    size = tuple(_check_int(s, "a size entry") for s in size)
    stride = tuple(_check_int(s, "a stride entry") for s in stride)
    if len(size) != len(stride):
        raise CheckpointError(f"tensor record: size {size} and stride {stride} differ in rank")
    data = storage.data
    if 0 in size:
        return np.zeros(size, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= data.shape[0]:
        raise CheckpointError(
            f"tensor record: a view (offset {offset}, size {size}, stride {stride}) reaches "
            f"element {last} of storage {storage.key!r}, which has only {data.shape[0]} "
            f"elements; the file is damaged"
        )
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, order="C", copy=True)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is not None:
            return fn
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"refusing to load the global '{module}.{name}' from the checkpoint: only tensor "
            "records (torch._utils._rebuild_tensor_v2 and plain storages), "
            "collections.OrderedDict and plain containers are allowed, and code from a "
            "checkpoint is never run. If the file holds a whole pickled model or other "
            "objects, save only tensors (e.g. {'model': model.state_dict()}) with torch"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(
                f"unsupported persistent id in the checkpoint: {pid!r} "
                "(only ('storage', type, key, location, numel) records)"
            )
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(
                f"persistent id {pid!r}: storage type is not one of "
                f"torch.{{{', '.join(STORAGE_DTYPES)}}}"
            )
        return self._load_storage(stype, str(key), _check_int(numel, "storage numel"))


def _describe_non_zip(path: str, head: bytes) -> str:
    if head.startswith(_LEGACY_PREFIX) or head.startswith(b"\x80\x02\x8a\x0a"):
        return (
            f"{path} is in PyTorch's legacy (pre-1.6, non-zip) checkpoint format, which "
            f"this reader does not support; {_RESAVE_HINT}"
        )
    try:
        if tarfile.is_tarfile(path):
            return (
                f"{path} is in PyTorch's old tar checkpoint format, which this reader does "
                f"not support; {_RESAVE_HINT}"
            )
    except OSError:
        pass
    if head.startswith(b"PK"):
        return (
            f"{path} starts like a zip archive but cannot be opened as one (truncated or "
            f"damaged, {os.path.getsize(path)} bytes): download or copy it again"
        )
    return (
        f"{path} is not a PyTorch zip checkpoint (it does not start with a zip header, "
        f"first bytes {head[:8]!r})"
    )


def _find_prefix(names: list[str], path: str) -> str:
    pkl = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if len(pkl) != 1:
        raise CheckpointError(
            f"{path}: expected exactly one '<name>/data.pkl' record in the zip archive, found "
            f"{len(pkl)} (records: {names[:8]}{' ...' if len(names) > 8 else ''}); is this a "
            "file written by torch.save?"
        )
    return pkl[0][: -len("data.pkl")]


def load_pth(path: str | os.PathLike) -> object:
    """Unpickle a PyTorch zip checkpoint with tensors as numpy arrays (see module doc).

    Raises:
      CheckpointError: legacy / tar / damaged / truncated files, a disallowed global (named),
        a storage record of the wrong size, or a tensor view outside its storage.
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(32)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(_describe_non_zip(path, head))
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path}: damaged zip archive ({e}); download or copy it again"
        ) from e
    with zf:
        names = zf.namelist()
        prefix = _find_prefix(names, path)

        def read(name: str) -> bytes:
            try:
                return zf.read(name)
            except KeyError:
                raise CheckpointError(
                    f"{path}: record '{name}' is missing from the archive "
                    "(truncated or not written by torch.save)"
                ) from None
            except (zipfile.BadZipFile, zlib_error, OSError, EOFError) as e:
                raise CheckpointError(
                    f"{path}: record '{name}' cannot be read ({e}); the "
                    "file is truncated or damaged"
                ) from e

        if prefix + "version" not in names and prefix + ".data/version" not in names:
            raise CheckpointError(
                f"{path}: no '{prefix}version' record; not a torch.save "
                "zip checkpoint (or truncated)"
            )
        order = "<"
        if prefix + "byteorder" in names:
            bo = read(prefix + "byteorder").decode("ascii", "replace").strip()
            if bo not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder record {bo!r}")
            order = "<" if bo == "little" else ">"
        cache: dict[str, _Storage] = {}

        def load_storage(stype: _StorageType, key: str, numel: int) -> _Storage:
            if key in cache:
                st = cache[key]
                if st.data.dtype != stype.dtype:
                    raise CheckpointError(f"{path}: storage {key!r} is used with two types")
                return st
            raw = read(f"{prefix}data/{key}")
            need = numel * stype.dtype.itemsize
            if len(raw) < need:
                raise CheckpointError(
                    f"{path}: storage {key!r} ({stype.name}) should hold {numel} elements "
                    f"({need} bytes) but its record has {len(raw)} bytes; the file is "
                    "truncated or damaged"
                )
            dt = stype.dtype if stype.dtype.itemsize == 1 else stype.dtype.newbyteorder(order)
            data = np.frombuffer(raw[:need], dtype=dt).astype(stype.dtype, copy=True)
            st = _Storage(key, data)
            cache[key] = st
            return st

        payload = read(prefix + "data.pkl")
        try:
            return _RestrictedUnpickler(io.BytesIO(payload), load_storage).load()
        except CheckpointError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            TypeError,
            AttributeError,
            ValueError,
            IndexError,
            KeyError,
            struct.error,
        ) as e:
            raise CheckpointError(
                f"{path}: the pickle in '{prefix}data.pkl' is invalid or "
                f"truncated ({type(e).__name__}: {e})"
            ) from e


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, np.ndarray) for v in obj.values())
    )


def extract_state_dict(obj) -> tuple[collections.OrderedDict, dict]:
    """The model state dict inside a loaded checkpoint, and how it was found.

    Accepts a bare state dict or a dict holding one under one of :data:`STATE_DICT_KEYS`
    (the released DKNet file: ``{'model': ..., 'optimizer': ...}``). A ``module.`` prefix
    (DataParallel) on every key is removed, as the released ``checkpoint_restore`` does.

    Returns:
      (state_dict, info) with info ``{'source': key or None, 'other_keys': [...],
      'stripped_prefix': 'module.' or ''}``.
    """
    source = None
    if _is_state_dict(obj):
        sd = obj
    elif isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                source, sd = key, obj[key]
                break
        else:
            desc = {k: type(v).__name__ for k, v in obj.items()}
            raise CheckpointError(
                f"no model state dict in the checkpoint: top-level keys {desc}; expected a "
                f"dict of name -> tensor, directly or under one of {list(STATE_DICT_KEYS)}"
            )
    else:
        raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    prefix = "module." if all(k.startswith("module.") for k in sd) else ""
    out = collections.OrderedDict((k[len(prefix) :], v) for k, v in sd.items())
    other = [k for k in obj if k != source] if source is not None else []
    return out, {"source": source, "other_keys": other, "stripped_prefix": prefix}


def read_state_dict(path: str | os.PathLike) -> tuple[collections.OrderedDict, dict]:
    """:func:`load_pth` then :func:`extract_state_dict`."""
    return extract_state_dict(load_pth(path))


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True, eq=False)
class StridedTensor:
    """A tensor written as a view into ``storage`` (1-D array); tensors whose ``storage``
    is the same object share one storage record in the file."""

    storage: np.ndarray
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _PickleWriter:
    """Emits the protocol-2 subset torch writes: containers, numbers, strings, tensors."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        # id(base) -> (key, flat contiguous copy, base kept alive so that ids stay unique)
        self.storages: dict[int, tuple[str, np.ndarray, np.ndarray]] = {}

    def _global(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def _storage_key(self, base: np.ndarray) -> tuple[str, np.ndarray]:
        if id(base) not in self.storages:
            flat = np.ascontiguousarray(base).reshape(-1)
            if flat.dtype not in _DTYPE_TO_STORAGE:
                raise TypeError(
                    f"save_pth: dtype {flat.dtype} has no torch storage type "
                    f"(supported: {sorted(str(d) for d in _DTYPE_TO_STORAGE)})"
                )
            self.storages[id(base)] = (str(len(self.storages)), flat, base)
        key, flat, _ = self.storages[id(base)]
        return key, flat

    def _tensor(self, base, offset, shape, stride) -> None:
        key, flat = self._storage_key(base)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("
        self.out += b"("  # persistent id tuple
        self.emit("storage")
        self._global("torch", _DTYPE_TO_STORAGE[flat.dtype])
        self.emit(key)
        self.emit("cpu")
        self.emit(int(flat.size))
        self.out += b"tQ"
        self.emit(int(offset))
        self.emit(tuple(int(s) for s in shape))
        self.emit(tuple(int(s) for s in stride))
        self.emit(False)
        self.emit(collections.OrderedDict())
        self.out += b"tR"

    def emit(self, obj) -> None:
        o = self.out
        if obj is None:
            o += b"N"
        elif obj is True or obj is False:
            o += b"\x88" if obj else b"\x89"
        elif isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
            v = int(obj)
            if 0 <= v < 256:
                o += b"K" + bytes([v])
            elif -(2**31) <= v < 2**31:
                o += b"J" + struct.pack("<i", v)
            else:
                b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                o += b"\x8a" + bytes([len(b)]) + b
        elif isinstance(obj, (float, np.floating)):
            o += b"G" + struct.pack(">d", float(obj))
        elif isinstance(obj, str):
            b = obj.encode("utf-8")
            o += b"X" + struct.pack("<I", len(b)) + b
        elif isinstance(obj, tuple):
            if not obj:
                o += b")"
            else:
                o += b"("
                for x in obj:
                    self.emit(x)
                o += b"t"
        elif isinstance(obj, list):
            o += b"]"
            if obj:
                o += b"("
                for x in obj:
                    self.emit(x)
                o += b"e"
        elif isinstance(obj, Mapping):
            if isinstance(obj, collections.OrderedDict):
                self._global("collections", "OrderedDict")
                o += b")R"
            else:
                o += b"}"
            if obj:
                o += b"("
                for k, v in obj.items():
                    self.emit(k)
                    self.emit(v)
                o += b"u"
        elif isinstance(obj, StridedTensor):
            base = np.asarray(obj.storage)
            if base.ndim != 1:
                raise TypeError("save_pth: StridedTensor.storage must be 1-D")
            self._tensor(base, obj.offset, obj.shape, obj.stride)
        elif isinstance(obj, (np.ndarray, np.generic)):
            a = np.asarray(obj)
            if not a.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
                a = a.copy(order="C")
            stride = tuple(int(np.prod(a.shape[i + 1 :], dtype=np.int64)) for i in range(a.ndim))
            self._tensor(a, 0, a.shape, stride)
        else:
            raise TypeError(
                f"save_pth: cannot write a {type(obj).__name__} (only dicts, lists, "
                "tuples, str, int, float, bool, None and numpy arrays)"
            )


def save_pth(obj, path: str | os.PathLike, *, archive_name: str = "archive") -> None:
    """Write ``obj`` (dicts / lists / tuples / scalars / numpy arrays / StridedTensor) as a
    PyTorch zip checkpoint that :func:`load_pth` and ``torch.load`` read. The file appears
    atomically (written to a temporary name, then renamed)."""
    w = _PickleWriter()
    w.emit(obj)
    w.out += b"."
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    p = archive_name.rstrip("/") + "/"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(p + "data.pkl", bytes(w.out))
            zf.writestr(p + "byteorder", "little")
            for key, flat, _ in w.storages.values():
                zf.writestr(p + "data/" + key, flat.astype(flat.dtype.newbyteorder("<")).tobytes())
            zf.writestr(p + "version", "3\n")
            zf.writestr(p + ".data/version", "3\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
