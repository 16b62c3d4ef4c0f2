"""PyTorch zip archives and safetensors files read as data, one tensor at a time, without torch and without
running anything in them.

OpenAI's original CLIP files (`ViT-B-32.pt`, ...) are TorchScript archives, which `torch.load(weights_only=
True)` refuses and `torch.jit.load` would run. Both they and `torch.save`'s files are zips with a pickle,
`data.pkl`, that describes the object, and one record per tensor storage under `data/`. This module reads
that pickle with an unpickler that builds nothing but:
  - tensors that know their storage record, offset, shape and strides (`ArchiveTensor`), through
    `torch._utils._rebuild_tensor_v2` (checked to stay inside its storage) and `_rebuild_parameter`;
  - a `ScriptObject` for every `__torch__.*` class: its name and the attributes the archive stores
    (the TorchScript code in `code/` is never read);
  - dicts, lists and TorchScript's list builders.
Any other global (a function such as `os.system`, any class) is refused before it is looked up, so the
archive cannot make the reader call anything else. A safetensors file's header gives the same lazy
tensors (`SafetensorsTensor`).

Tensors are read lazily and one at a time: listing the names and shapes of a file reads its pickle or
header alone, and `numpy()` reads that one tensor's bytes, keeping nothing once the array is dropped. So
an importer that converts tensor by tensor holds one source tensor at a time, never the whole file
(`state_dict_tensors`, `safetensors_tensors`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from soupjax.cli.errors import InputError
from soupjax.importers.state_dict import unwrap as unwrap_state_dict

# torch's typed storages, as the pickle names them.
_STORAGE_DTYPES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
}


class _Sealed:
    """Refuses a pickle's BUILD: what the reader made and checked cannot be changed by the archive."""

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f'the archive tries to set the state of a {type(self).__name__}')


class ScriptObject:
    """A TorchScript module or object of the archive: its class name and its stored attributes."""

    type_name = '__torch__.object'

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def attributes(self) -> dict[str, Any]:
        state = getattr(self, 'state', None)
        return state if isinstance(state, dict) else {}


@dataclasses.dataclass(frozen=True)
class _StorageType(_Sealed):
    dtype: str


@dataclasses.dataclass(frozen=True)
class _Storage(_Sealed):
    archive: TorchArchive
    key: str
    dtype: str
    numel: int


@dataclasses.dataclass(frozen=True)
class ArchiveTensor(_Sealed):
    """A tensor of the archive, read from its storage only when `numpy()` is called."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    def fits(self) -> bool:
        """Whether every element lies inside the storage (as_strided would read past it otherwise),
        and the tensor is no larger than it (so an archive cannot make the reader allocate more than
        the file holds by broadcasting one element)."""
        count = math.prod(self.shape)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides))
        return count <= self.storage.numel and (count == 0 or last < self.storage.numel)

    def numpy(self) -> np.ndarray:
        """The tensor as a numpy array, its storage record read now and not kept (bfloat16 and float16
        come back as float32). Read-only when it is the record's bytes as they are (a tensor that is its
        whole storage, contiguous, in the machine's byte order); a copy of the elements it covers else."""
        if not self.fits():
            raise InputError(f'{self.storage.archive.path}: a tensor reaches past its storage')
        flat = self.storage.archive.storage_array(self.storage)
        if self.offset == 0 and math.prod(self.shape) == flat.size and self.strides == _contiguous(self.shape):
            array = flat.reshape(self.shape)
        else:
            itemsize = flat.dtype.itemsize
            array = np.array(np.lib.stride_tricks.as_strided(
                flat[self.offset:], shape=self.shape, strides=[s * itemsize for s in self.strides],
                writeable=False))
        return _widened(array)


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides (in elements) of a C-contiguous tensor of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _widened(array: np.ndarray) -> np.ndarray:
    """float16 and bfloat16 as float32 (numpy computes neither well); other dtypes as they are."""
    return array.astype(np.float32) if array.dtype.name in ('bfloat16', 'float16') else array


class TorchArchive:
    """A torch.save or torch.jit.save zip, opened for reading its pickle and its storages as data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f'{self.path}: not a PyTorch zip archive ({e})') from None
        pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
        if not pickles:
            raise InputError(f'{self.path}: a zip without data.pkl, not a PyTorch archive')
        self._pickle = min(pickles, key=len)
        self.prefix = self._pickle[:-len('data.pkl')]
        # torch's own test (serialization._is_torchscript_zip): TorchScript archives keep constants.pkl.
        self.is_torchscript = f'{self.prefix}constants.pkl' in names
        order = f'{self.prefix}byteorder'
        self._big_endian = order in names and self._zip.read(order).strip() == b'big'

    @functools.cached_property
    def root(self) -> Any:
        """The unpickled object: a dict for torch.save's state dicts, a ScriptObject for TorchScript."""
        try:
            with self._zip.open(self._pickle) as file:
                return _DataUnpickler(file, self).load()
        except InputError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, RecursionError) as e:
            raise InputError(f'{self.path}: data.pkl is not plain tensors and modules, so soupjax did not '
                             f'read it ({e}); nothing in it ran') from None

    def storage_array(self, storage: _Storage) -> np.ndarray:
        """The flat array of one storage record, read from the zip now and not kept: read-only, over the
        record's bytes (a copy only for a big-endian archive)."""
        name = f'{self.prefix}data/{storage.key}'
        try:
            raw = self._zip.read(name)
        except KeyError:
            raise InputError(f'{self.path}: storage record {name} is missing') from None
        dtype = _numpy_dtype(storage.dtype)
        if self._big_endian:
            dtype = dtype.newbyteorder('>')
        if len(raw) < storage.numel * dtype.itemsize:
            raise InputError(f'{self.path}: storage record {name} holds {len(raw)} bytes, '
                             f'fewer than its {storage.numel} {storage.dtype} elements')
        array = np.frombuffer(raw, dtype=dtype, count=storage.numel)
        return array.astype(dtype.newbyteorder('=')) if self._big_endian else array

    def tensors(self) -> dict[str, ArchiveTensor]:
        """Every tensor by its state-dict name ('visual.conv1.weight'), read lazily."""
        return {name: value for name, value in walk(self.root) if isinstance(value, ArchiveTensor)}

    def modules(self) -> dict[str, ScriptObject]:
        """Every TorchScript object by its attribute path ('' for the root); empty for a state dict."""
        return {name: value for name, value in walk(self.root) if isinstance(value, ScriptObject)}


def walk(obj: Any, prefix: str = '', seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    """(dotted name, value) for the object and everything stored under it, as state_dict names them;
    an object met again (a pickle may hold cycles) is not entered twice."""
    seen = set() if seen is None else seen
    yield prefix, obj
    if id(obj) in seen:
        return
    seen.add(id(obj))
    children = obj.attributes if isinstance(obj, ScriptObject) else obj if isinstance(obj, dict) else {}
    for key, value in children.items():
        if isinstance(key, str) and isinstance(value, (ScriptObject, dict, ArchiveTensor)):
            yield from walk(value, f'{prefix}.{key}' if prefix else key, seen)


def _numpy_dtype(name: str) -> np.dtype:
    if name == 'bfloat16':
        import ml_dtypes  # a dependency of JAX
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _DataUnpickler(pickle.Unpickler):
    """Builds tensors, dicts, lists and ScriptObject stubs; refuses every other global."""

    def __init__(self, file: Any, archive: TorchArchive):
        super().__init__(file)
        self._archive = archive
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith('__torch__'):
            full = f'{module}.{name}'
            if full not in self._classes:
                self._classes[full] = type(name, (ScriptObject,), {'type_name': full})
            return self._classes[full]
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        allowed = {
            ('torch._utils', '_rebuild_tensor_v2'): self._rebuild_tensor,
            ('torch._utils', '_rebuild_parameter'): lambda data, requires_grad, hooks: data,
            ('collections', 'OrderedDict'): collections.OrderedDict,
            ('torch.jit._pickle', 'build_intlist'): list,
            ('torch.jit._pickle', 'build_doublelist'): list,
            ('torch.jit._pickle', 'build_boollist'): list,
            ('torch.jit._pickle', 'build_tensorlist'): list,
            ('torch.jit._pickle', 'restore_type_tag'): lambda value, tag: value,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f'global {module}.{name} is not allowed')
        return allowed[(module, name)]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType) and pid[1].dtype in _STORAGE_DTYPES.values()
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f'unsupported persistent id {pid!r:.80}')
        return _Storage(self._archive, str(pid[2]), pid[1].dtype, pid[4])

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> ArchiveTensor:
        ints = lambda values: isinstance(values, (tuple, list)) and all(  # noqa: E731
            isinstance(v, int) and v >= 0 for v in values)
        if not (isinstance(storage, _Storage) and isinstance(offset, int) and offset >= 0
                and ints(size) and ints(stride) and len(size) == len(stride)):
            raise pickle.UnpicklingError('a tensor record that is not (storage, offset, size, stride)')
        tensor = ArchiveTensor(storage, offset, tuple(size), tuple(stride))
        if not tensor.fits():
            raise pickle.UnpicklingError(f'a tensor of shape {tuple(size)} reaches past its storage '
                                         f'of {storage.numel} elements')
        return tensor


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of a PyTorch zip archive, reading its pickle only."""
    return {name: tensor.shape for name, tensor in TorchArchive(path).tensors().items()}


# What torch.save's training checkpoints wrap a state dict in (as importers.sources.timm unwraps them).


def state_dict_tensors(path: str | Path) -> dict[str, ArchiveTensor]:
    """The tensors of a `torch.save` state dict zip by name, unread (each `numpy()` reads that one):
    a training checkpoint's 'state_dict_ema' / 'state_dict' / 'model' unwrapped and DistributedDataParallel's
    'module.' dropped, values that are not tensors left out, as torch.load-based readers do. InputError when
    the file is not such a zip, or its pickle needs more than tensors and containers."""
    archive = TorchArchive(path)
    root = unwrap_state_dict(archive.root, archive.path)
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in root.items()
            if isinstance(k, str) and isinstance(v, ArchiveTensor)}


# safetensors' dtype names -> numpy's (bfloat16 through ml_dtypes, a dependency of JAX).
_SAFETENSORS_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16',
                       'I64': 'int64', 'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U64': 'uint64',
                       'U32': 'uint32', 'U16': 'uint16', 'U8': 'uint8', 'BOOL': 'bool'}
_MAX_HEADER = 100 << 20


@dataclasses.dataclass(frozen=True)
class SafetensorsTensor:
    """A tensor of a safetensors file, read from its byte range only when `numpy()` is called."""

    path: Path
    name: str
    dtype: str  # safetensors' name: 'F32', 'BF16', ...
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    def numpy(self) -> np.ndarray:
        """The tensor as a read-only numpy array over the bytes just read (bfloat16 and float16 come back
        as float32, a copy)."""
        if self.dtype not in _SAFETENSORS_DTYPES:
            raise InputError(f'{self.path}: tensor {self.name} is of dtype {self.dtype}, which soupjax does not '
                             f'read ({", ".join(_SAFETENSORS_DTYPES)})')
        with open(self.path, 'rb') as f:
            f.seek(self.begin)
            raw = f.read(self.end - self.begin)
        if len(raw) != self.end - self.begin:
            raise InputError(f'{self.path}: tensor {self.name} is cut short (the file ends inside it)')
        dtype = _numpy_dtype(_SAFETENSORS_DTYPES[self.dtype]).newbyteorder('<')
        return _widened(np.frombuffer(raw, dtype=dtype).reshape(self.shape))


def safetensors_tensors(path: str | Path) -> dict[str, SafetensorsTensor]:
    """The tensors of a safetensors file by name, from its header alone (each `numpy()` reads that one);
    InputError naming the file when the header is not a safetensors header or a tensor's byte range does
    not fit its shape or the file."""
    path = Path(path)
    try:
        with path.open('rb') as f:
            head = f.read(8)
            if len(head) != 8:
                raise InputError(f'{path}: not a safetensors file (shorter than its header)')
            length = int.from_bytes(head, 'little')
            if length > _MAX_HEADER:
                raise InputError(f'{path}: not a safetensors file (a header of {length} bytes)')
            header = json.loads(f.read(length))
        size = path.stat().st_size
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f'{path}: not a safetensors file ({e})') from None
    except OSError as e:
        raise InputError(f'{path}: not readable ({e})') from None
    if not isinstance(header, dict):
        raise InputError(f'{path}: not a safetensors file (its header is not a JSON object)')
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype, shape, (begin, end) = str(entry['dtype']), tuple(int(n) for n in entry['shape']), entry['data_offsets']
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError) as e:
            raise InputError(f'{path}: tensor {name}: not a safetensors entry ({e!r})') from None
        itemsize = np.dtype(_numpy_dtype(_SAFETENSORS_DTYPES[dtype])).itemsize if dtype in _SAFETENSORS_DTYPES else None
        if (min(shape, default=0) < 0 or not 0 <= begin <= end or start + end > size
                or (itemsize is not None and end - begin != math.prod(shape) * itemsize)):
            raise InputError(f'{path}: tensor {name} ({dtype} {shape}) has bytes {begin}-{end}, which do not fit '
                             f'its shape or the file ({size - start} bytes of data)')
        tensors[name] = SafetensorsTensor(path, name, dtype, shape, start + begin, start + end)
    return tensors
