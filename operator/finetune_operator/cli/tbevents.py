"""A small reader of TensorBoard event files: the scalars, nothing else. Pure, no dependencies.

The trainer's TensorBoard callback writes ``events.out.tfevents.*`` files: TFRecords (a little-endian
uint64 length, a masked CRC of it, the payload, a masked CRC of that) whose payloads are ``Event``
protocol buffers. Only the fields a scalar needs are decoded: ``Event.wall_time`` (1, double),
``Event.step`` (2, int64), ``Event.summary`` (5) -> ``Summary.value`` (1) -> ``Value.tag`` (1) and
either ``Value.simple_value`` (2, float) or a scalar ``Value.tensor`` (8: ``float_val`` 5,
``double_val`` 6 or 4/8 bytes of ``tensor_content`` 4, by ``dtype`` 1). CRCs are not checked; a
truncated last record (a file still being written) ends the file, as TensorBoard does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

_FLOAT, _DOUBLE = 1, 2  # TensorFlow DataType enum values


@dataclass(frozen=True)
class Scalar:
    tag: str
    step: int
    value: float
    wall_time: float


def records(data: bytes) -> Iterator[bytes]:
    """The payloads of a TFRecord file."""
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + 12
        end = start + length
        if end + 4 > len(data):
            return  # truncated: the writer is still at it
        yield data[start:end]
        offset = end + 4


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of a protobuf message; lengths-delimited values as bytes,
    fixed32/fixed64 as raw little-endian integers."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value = buf[pos : pos + length]
            pos += length
        elif wire == 5:
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _f32(raw: int) -> float:
    return float(struct.unpack("<f", raw.to_bytes(4, "little"))[0])


def _f64(raw: int) -> float:
    return float(struct.unpack("<d", raw.to_bytes(8, "little"))[0])


def _tensor_scalar(buf: bytes) -> float | None:
    dtype = 0
    content = b""
    values: list[float] = []
    for number, _, value in fields(buf):
        if number == 1 and isinstance(value, int):
            dtype = value
        elif number == 4 and isinstance(value, bytes):
            content = value
        elif number == 5:  # float_val: packed (bytes) or one fixed32
            if isinstance(value, bytes):
                values += [float(v) for v in struct.unpack(f"<{len(value) // 4}f", value)]
            else:
                values.append(_f32(value))
        elif number == 6:  # double_val
            if isinstance(value, bytes):
                values += [float(v) for v in struct.unpack(f"<{len(value) // 8}d", value)]
            else:
                values.append(_f64(value))
    if values:
        return values[0]
    if dtype == _FLOAT and len(content) == 4:
        return float(struct.unpack("<f", content)[0])
    if dtype == _DOUBLE and len(content) == 8:
        return float(struct.unpack("<d", content)[0])
    return None


def _summary_values(buf: bytes) -> Iterator[tuple[str, float]]:
    for number, _, value in fields(buf):
        if number != 1 or not isinstance(value, bytes):
            continue
        tag = ""
        scalar: float | None = None
        for field, wire, item in fields(value):
            if field == 1 and isinstance(item, bytes):
                tag = item.decode("utf-8", errors="replace")
            elif field == 2 and wire == 5 and isinstance(item, int):
                scalar = _f32(item)
            elif field == 8 and isinstance(item, bytes):
                scalar = _tensor_scalar(item)
        if tag and scalar is not None:
            yield tag, scalar


def read_scalars(data: bytes) -> list[Scalar]:
    """Every scalar in one event file, in file order."""
    found: list[Scalar] = []
    for payload in records(data):
        wall_time, step = 0.0, 0
        summaries: list[bytes] = []
        for number, _, value in fields(payload):
            if number == 1 and isinstance(value, int):
                wall_time = _f64(value)
            elif number == 2 and isinstance(value, int):
                step = value - (1 << 64) if value >= 1 << 63 else value
            elif number == 5 and isinstance(value, bytes):
                summaries.append(value)
        for summary in summaries:
            found += [Scalar(tag, step, v, wall_time) for tag, v in _summary_values(summary)]
    return found
