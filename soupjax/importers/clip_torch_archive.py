"""PyTorch zip archives read as data, without torch and without running anything in them.

OpenAI's original CLIP files (`ViT-B-32.pt`, ...) are TorchScript archives, which `torch.load(weights_only=
True)` refuses and `torch.jit.load` would run. Both they and `torch.save`'s files are zips with a pickle,
`data.pkl`, that describes the object, and one record per tensor storage under `data/`. This module reads
that pickle with an unpickler that builds nothing but:
  - numpy arrays, from the `data/` records, through `torch._utils._rebuild_tensor_v2` (checked to stay
    inside its storage) and `_rebuild_parameter`;
  - a `ScriptObject` for every `__torch__.*` class: its name and the attributes the archive stores
    (the TorchScript code in `code/` is never read);
  - dicts, lists and TorchScript's list builders.
Any other global (a function such as `os.system`, any class) is refused before it is looked up, so the
archive cannot make the reader call anything else. Tensors are read lazily: listing the names and
shapes of an archive (to tell a CLIP file from a timm one) reads the pickle alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from soupjax.cli.errors import InputError

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
        """The tensor as a numpy array (bfloat16 and float16 come back as float32)."""
        if not self.fits():
            raise InputError(f'{self.storage.archive.path}: a tensor reaches past its storage')
        flat = self.storage.archive.storage_array(self.storage)
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.shape, strides=[s * itemsize for s in self.strides],
            writeable=False)
        array = np.array(view)
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
        self._storages: dict[str, np.ndarray] = {}

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
        """The flat array of one storage record, read once."""
        if storage.key not in self._storages:
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
            self._storages[storage.key] = array.astype(dtype.newbyteorder('='))
        return self._storages[storage.key]

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
