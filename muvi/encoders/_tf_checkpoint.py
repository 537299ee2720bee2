"""Read TensorFlow checkpoints (``Saver`` V2 tensor bundles) in pure Python, without TensorFlow.

muvi only needs this to load the trained ``musicnn`` weights, which ship as TF-1 checkpoints;
depending on TensorFlow for that would pull a 600 MB runtime into an evaluation suite.

A checkpoint with prefix ``P`` is two kinds of file:

* ``P.index`` — an SSTable in LevelDB's table format. Its footer (last 48 bytes) points to an
  index block, whose entries point to data blocks. Every block is a run of prefix-compressed
  ``(key, value)`` entries followed by restart offsets; on disk a block is followed by a
  1-byte compression type (0 raw, 1 snappy) and a masked CRC-32C. The entry with the empty key
  is a ``BundleHeaderProto`` (shard count, endianness); every other key is a tensor name whose
  value is a ``BundleEntryProto`` (dtype, shape, shard, offset, size).
* ``P.data-SSSSS-of-NNNNN`` — the tensors' raw bytes, at the offsets the index gives.

The protobufs are decoded by hand (a few fields only), so neither TensorFlow nor protobuf is
needed. Partitioned (sliced) variables and string tensors are not supported: the musicnn
checkpoints have neither, and reading them raises a clear error.
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_BLOCK_TRAILER_LEN = 5  # compression type (1 byte) + masked crc32c (4 bytes)

#: TensorFlow ``DataType`` enum values -> numpy dtypes (little-endian; flipped for big-endian bundles).
_TF_DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?",
              17: "<u2", 19: "<f2", 22: "<u4", 23: "<u8"}


class TFCheckpointError(ValueError):
    """A file that is not a readable TensorFlow tensor bundle, or a tensor this reader cannot decode."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the bundle's data files."""

    dtype: np.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int


# --------------------------------------------------------------------------- low-level decoding

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise TFCheckpointError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list]:
    """Decode one protobuf message into ``{field number: [values]}`` (nested messages stay bytes)."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise TFCheckpointError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


@functools.lru_cache(maxsize=1)
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum LevelDB tables use; pure Python, for small blocks only."""
    table = _crc32c_table()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def snappy_decompress(data: bytes) -> bytes:
    """Decode raw (unframed) snappy, the block compression LevelDB tables may use."""
    length, pos = _varint(data, 0)
    out = bytearray()
    while pos < len(data):
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal; lengths >= 61 are stored in 1-4 extra bytes
            n = tag >> 2
            if n >= 60:
                extra = n - 59
                n = int.from_bytes(data[pos:pos + extra], "little")
                pos += extra
            n += 1
            out += data[pos:pos + n]
            pos += n
            continue
        if kind == 1:
            n, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | data[pos]
            pos += 1
        elif kind == 2:
            n, offset = (tag >> 2) + 1, int.from_bytes(data[pos:pos + 2], "little")
            pos += 2
        else:
            n, offset = (tag >> 2) + 1, int.from_bytes(data[pos:pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise TFCheckpointError("corrupt snappy block (copy offset out of range)")
        for _ in range(n):  # byte by byte: copies may overlap their own output
            out.append(out[-offset])
    if len(out) != length:
        raise TFCheckpointError(f"corrupt snappy block ({len(out)} bytes, header says {length})")
    return bytes(out)


def _read_block(table: bytes, offset: int, size: int) -> bytes:
    end = offset + size
    if end + _BLOCK_TRAILER_LEN > len(table):
        raise TFCheckpointError("block handle points past the end of the index file")
    contents, kind = table[offset:end], table[end]
    expected = _unmask_crc(struct.unpack_from("<I", table, end + 1)[0])
    if crc32c(table[offset:end + 1]) != expected:
        raise TFCheckpointError(f"checksum mismatch in the index block at byte {offset}")
    if kind == 0:
        return contents
    if kind == 1:
        return snappy_decompress(contents)
    raise TFCheckpointError(f"unsupported block compression type {kind}")


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Entries of one block in order. Keys share a prefix with the previous key; a full scan
    only needs the restart array to know where the entries stop."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * num_restarts
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key):
            raise TFCheckpointError("corrupt index block (shared prefix longer than previous key)")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _table_entries(table: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(table) < _FOOTER_LEN or struct.unpack_from("<Q", table, len(table) - 8)[0] != _TABLE_MAGIC:
        raise TFCheckpointError("not an SSTable (bad magic number in the footer)")
    pos = len(table) - _FOOTER_LEN
    _, pos = _varint(table, pos)  # metaindex handle: unused by tensor bundles
    _, pos = _varint(table, pos)
    index_offset, pos = _varint(table, pos)
    index_size, _ = _varint(table, pos)
    for _, handle in _block_entries(_read_block(table, index_offset, index_size)):
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        yield from _block_entries(_read_block(table, offset, size))


# --------------------------------------------------------------------------- public API

def _index_path(prefix: str | Path) -> Path:
    # A prefix may end in a path separator (musicnn's "MSD_musicnn/" gives ".index" inside the
    # folder), so build the name by string concatenation, not with Path.with_suffix.
    return Path(str(prefix) + ".index")


def _data_path(prefix: str | Path, shard: int, num_shards: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def read_checkpoint_index(prefix: str | Path) -> tuple[dict[str, TensorInfo], int]:
    """Parse ``prefix.index``: ``({tensor name: TensorInfo}, number of data shards)``."""
    path = _index_path(prefix)
    if not path.is_file():
        raise FileNotFoundError(f"TensorFlow checkpoint index not found: {path}")
    infos: dict[str, TensorInfo] = {}
    num_shards, big_endian = 1, False
    for key, value in _table_entries(path.read_bytes()):
        fields = _proto_fields(value)
        if key == b"":  # BundleHeaderProto
            num_shards = fields.get(1, [1])[-1]
            big_endian = fields.get(2, [0])[-1] == 1
            continue
        name = key.decode("utf-8")
        if 7 in fields:
            raise TFCheckpointError(f"tensor {name!r} is partitioned (slices), which is not supported")
        dtype_enum = fields.get(1, [0])[-1]
        if dtype_enum not in _TF_DTYPES:
            raise TFCheckpointError(f"tensor {name!r} has TensorFlow dtype {dtype_enum}, not supported")
        dtype = np.dtype(_TF_DTYPES[dtype_enum])
        shape = tuple(_proto_fields(dim).get(1, [0])[-1]
                      for dim in _proto_fields(fields[2][-1]).get(2, [])) if 2 in fields else ()
        infos[name] = TensorInfo(dtype=dtype.newbyteorder(">") if big_endian else dtype, shape=shape,
                                 shard=fields.get(3, [0])[-1], offset=fields.get(4, [0])[-1],
                                 size=fields.get(5, [0])[-1])
    return infos, num_shards


def read_tf_checkpoint(prefix: str | Path, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read tensors of a TF checkpoint as native-endian numpy arrays.

    ``prefix`` is what ``tf.train.Saver.save`` was given (the file names without ``.index``).
    ``names`` selects tensors; by default all of them are read.
    """
    infos, num_shards = read_checkpoint_index(prefix)
    wanted = list(infos) if names is None else list(names)
    unknown = sorted(set(wanted) - set(infos))
    if unknown:
        raise KeyError(f"{_index_path(prefix)}: no tensor(s) {unknown}")
    out: dict[str, np.ndarray] = {}
    handles = {}
    try:
        for name in wanted:
            info = infos[name]
            expected = int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
            if info.size != expected:
                raise TFCheckpointError(f"tensor {name!r}: {info.size} bytes stored, shape "
                                        f"{info.shape} of {info.dtype} needs {expected}")
            if info.shard not in handles:
                path = _data_path(prefix, info.shard, num_shards)
                if not path.is_file():
                    raise FileNotFoundError(f"TensorFlow checkpoint data file not found: {path}")
                handles[info.shard] = path.open("rb")
            handle = handles[info.shard]
            handle.seek(info.offset)
            raw = handle.read(info.size)
            if len(raw) != info.size:
                raise TFCheckpointError(f"tensor {name!r}: data file ends before the tensor does")
            out[name] = np.frombuffer(raw, dtype=info.dtype).astype(info.dtype.newbyteorder("="))\
                .reshape(info.shape)
    finally:
        for handle in handles.values():
            handle.close()
    return out
