"""A lean GGUF file reader: metadata as plain Python values, tensors as memory-mapped numpy views.

`gguf.GGUFReader` builds a Python object for every part of every metadata field, which takes
seconds for a 150k-token vocabulary. This reader walks the same layout with `struct`, reads
numeric arrays with numpy, and maps the tensor data lazily. Tensor views have the shapes
GGUFReader gives them (quantized types as rows of block bytes), so code and tests can use
either.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value types (gguf.GGUFValueType) -> (struct format, numpy dtype) for the fixed-size ones
_SCALARS = {
    0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16),
    4: ("I", np.uint32), 5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_),
    10: ("Q", np.uint64), 11: ("q", np.int64), 12: ("d", np.float64),
}
_STRING, _ARRAY = 8, 9
_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The file is cut short or is not laid out as GGUF; the message names the file and is one line."""


def _not_gguf(path: Path, problem: str) -> GGUFFormatError:
    return GGUFFormatError(f"{path} is truncated or not a valid GGUF file: {problem}")


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    data: np.ndarray  # memory-mapped view, rows first


class _Cursor:
    """Reads GGUF values from a buffer in the file's byte order. Reading past the end of the
    buffer (a truncated file, or lengths that are garbage) raises GGUFFormatError."""

    def __init__(self, buf: memoryview, pos: int, order: str, path: Path):
        self.buf, self.pos, self.order, self.path = buf, pos, order, path

    def _need(self, n_bytes: int, what: str) -> None:
        if self.pos + n_bytes > len(self.buf):
            raise _not_gguf(self.path, f"{what} at byte {self.pos:,} ends past the end of the file "
                                       f"({len(self.buf):,} bytes)")

    def unpack(self, fmt: str) -> Any:
        self._need(struct.calcsize(fmt), "the metadata")
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        self._need(n, f"a {n:,}-byte string")
        try:
            text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _not_gguf(self.path, f"the string at byte {self.pos:,} is not UTF-8") from None
        self.pos += n
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("I"), self.unpack("Q")
            if item_kind in _SCALARS:
                dtype = np.dtype(_SCALARS[item_kind][1]).newbyteorder(self.order)
                self._need(count * dtype.itemsize, f"an array of {count:,} values")
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return values.tolist()
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise _not_gguf(self.path, f"unknown GGUF value type {kind} before byte {self.pos:,}")
        return self.unpack(_SCALARS[kind][0])

    def skip(self, kind: int) -> None:
        """Step over a value without building it (strings and numeric arrays are O(1))."""
        if kind == _STRING:
            length = self.unpack("Q")  # (not `pos += unpack()`: that reads pos before the length)
            self._need(length, f"a {length:,}-byte string")
            self.pos += length
        elif kind == _ARRAY:
            item_kind, count = self.unpack("I"), self.unpack("Q")
            if item_kind in _SCALARS:
                self._need(count * struct.calcsize(_SCALARS[item_kind][0]), f"an array of {count:,} values")
                self.pos += count * struct.calcsize(_SCALARS[item_kind][0])
            else:
                for _ in range(count):
                    self.skip(item_kind)
        elif kind in _SCALARS:
            self._need(struct.calcsize(_SCALARS[kind][0]), "the metadata")
            self.pos += struct.calcsize(_SCALARS[kind][0])
        else:
            raise _not_gguf(self.path, f"unknown GGUF value type {kind} before byte {self.pos:,}")


def _map(path: Path) -> np.memmap | bytes:
    """The file's bytes, memory-mapped (numpy cannot map an empty file: b"" then)."""
    return np.memmap(path, mode="r", dtype=np.uint8) if os.path.getsize(path) else b""


def _header(buf: memoryview, path: Path) -> tuple[_Cursor, int, int]:
    """(cursor at the first key, tensor count, key count); detects the byte order."""
    if len(buf) < len(_MAGIC):
        raise _not_gguf(path, f"{len(buf)} bytes, fewer than a GGUF header's")
    if bytes(buf[:4]) != _MAGIC:
        raise GGUFFormatError(f"{path} is not a GGUF file")
    cursor = _Cursor(buf, 4, "<", path)
    version = cursor.unpack("I")
    if version & 0xFFFF == 0:  # a big-endian file reads as 0x0300_0000 here
        cursor.order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported")
    return cursor, cursor.unpack("Q"), cursor.unpack("Q")


class GGUFFile:
    """An opened GGUF file: `metadata` (dict of plain values) and `tensors` (list).

    A file cut short (an interrupted copy or download) or not laid out as GGUF raises
    GGUFFormatError naming the file and what is missing, before any tensor is read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map = _map(self.path)
        cursor, n_tensors, n_kv = _header(memoryview(self._map), self.path)
        self.byte_order = "I" if cursor.order == "<" else "S"  # as gguf.GGUFReader says it
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = tuple(cursor.unpack("Q") for _ in range(cursor.unpack("I")))
            code = cursor.unpack("I")
            try:
                kind = GGMLQuantizationType(code)
            except ValueError:
                raise _not_gguf(self.path, f"tensor {name!r} has unknown type {code}") from None
            infos.append((name, dims, kind, cursor.unpack("Q")))
        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1:
            raise _not_gguf(self.path, f"general.alignment is {alignment!r}")
        start = -(-cursor.pos // alignment) * alignment
        for name, _, _, offset in infos:  # (as llama.cpp requires; else garbage read as scales)
            if offset % alignment:
                raise _not_gguf(self.path, f"the data of tensor {name!r} starts at offset {offset:,}, "
                                           f"not a multiple of the alignment ({alignment})")
        self._check_data_ranges(start, infos)
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _check_data_ranges(self, start: int, infos: list) -> None:
        """Every tensor's bytes must lie within the file: a cut inside the tensor data would
        otherwise surface as a reshape error, or as zeros read from the mapped page."""
        size = len(self._map)
        beyond = []  # (name, first byte, end) of tensors not wholly in the file
        for name, dims, kind, offset in infos:
            begin = start + offset
            end = begin + _n_bytes(dims, kind)
            if end > size:
                beyond.append((name, begin, end))
        if beyond:
            name, begin, end = beyond[0]
            needed = max(end for _, _, end in beyond)
            # (One tensor cut off, the last, is the common case: a download stopped short.)
            cut = (f"1 of its {len(infos)} tensors is cut off: {name!r}" if len(beyond) == 1 else
                   f"{len(beyond)} of its {len(infos)} tensors are cut off, the first being {name!r}")
            raise GGUFFormatError(
                f"{self.path} is truncated: it has {size:,} bytes and its tensor data needs {needed:,} "
                f"({needed - size:,} missing); {cut} (bytes {begin:,}-{end:,})")

    def _tensor(self, start: int, name: str, dims: tuple, kind: GGMLQuantizationType, offset: int) -> GGUFTensor:
        np_dims = tuple(reversed(dims))
        begin = start + offset
        raw = self._map[begin : begin + _n_bytes(dims, kind)]
        if kind in _PLAIN_DTYPES:
            data = raw.view(_PLAIN_DTYPES[kind]).reshape(np_dims)
        elif dims and dims[0] % GGML_QUANT_SIZES[kind][0]:
            # Rows that are no whole number of blocks: left as bytes for convert_tensor to refuse,
            # naming the tensor (and saying first when its type is one we cannot load at all),
            # where gguf's reshape said only "row size (64) is not a multiple of ... block size".
            data = raw
        else:
            data = raw.reshape(quant_shape_to_byte_shape(np_dims, kind))
        return GGUFTensor(name, kind, tuple(dims), data)


def _n_bytes(dims: tuple, kind: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[kind]
    return math.prod(dims) * type_size // block  # Python integers: no overflow on garbage dims


def read_gguf_keys(path: str | Path, keys) -> dict[str, Any]:
    """Only the named metadata keys, stopping as soon as all are found: milliseconds, where
    reading all metadata walks the whole vocabulary. Missing keys are absent from the result."""
    path = Path(path)
    wanted, found = set(keys), {}
    cursor, _, n_kv = _header(memoryview(_map(path)), path)
    for _ in range(n_kv):
        if wanted <= found.keys():
            break
        key = cursor.string()
        kind = cursor.unpack("I")
        if key in wanted:
            found[key] = cursor.value(kind)
        else:
            cursor.skip(kind)
    return found


def open_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file read-only (tensor data stays memory-mapped)."""
    return GGUFFile(path)


def read_gguf_metadata(source: str | Path | GGUFFile) -> dict[str, Any]:
    """Every metadata field as str / int / float / bool / list of those."""
    reader = source if isinstance(source, GGUFFile) else open_gguf(source)
    return dict(reader.metadata)
