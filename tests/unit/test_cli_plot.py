"""The TensorBoard event reader and the merging of attempts into curves (ftjob plot's data)."""

from __future__ import annotations

import struct

import pytest

from finetune_operator.cli.plot import curves
from finetune_operator.cli.tbevents import Scalar, read_scalars

pytestmark = pytest.mark.unit


# A minimal protobuf/TFRecord encoder, written from the format, to produce event files by hand.
def varint(n: int) -> bytes:
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def field(number: int, wire: int, payload: bytes) -> bytes:
    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def event(wall_time: float, step: int, tag: str, value: float, *, style: str = "simple") -> bytes:
    if style == "simple":
        scalar = field(2, 5, struct.pack("<f", value))
    elif style == "tensor_float_val":
        scalar = field(8, 2, field(1, 0, varint(1)) + field(5, 2, struct.pack("<f", value)))
    else:  # tensor_content, double
        scalar = field(8, 2, field(1, 0, varint(2)) + field(4, 2, struct.pack("<d", value)))
    summary_value = field(1, 2, tag.encode()) + scalar
    body = (
        field(1, 1, struct.pack("<d", wall_time))
        + field(2, 0, varint(step))
        + field(5, 2, field(1, 2, summary_value))
    )
    return body


def tfrecord(*payloads: bytes) -> bytes:
    return b"".join(struct.pack("<Q", len(p)) + b"\0" * 4 + p + b"\0" * 4 for p in payloads)


def test_reads_scalars_of_every_encoding() -> None:
    header = field(1, 1, struct.pack("<d", 1.0)) + field(3, 2, b"brain.Event:2")  # file_version record
    data = tfrecord(
        header,
        event(10.0, 1, "train/loss", 2.5),
        event(11.0, 2, "train/loss", 2.25, style="tensor_float_val"),
        event(12.0, 2, "eval/loss", 2.125, style="tensor_double"),
        event(13.0, 300, "train/learning_rate", 1e-4),
    )
    assert read_scalars(data) == [
        Scalar("train/loss", 1, 2.5, 10.0),
        Scalar("train/loss", 2, 2.25, 11.0),
        Scalar("eval/loss", 2, 2.125, 12.0),
        Scalar("train/learning_rate", 300, pytest.approx(1e-4), 13.0),  # type: ignore[arg-type]
    ]


def test_a_truncated_last_record_ends_the_file() -> None:
    data = tfrecord(event(1.0, 1, "train/loss", 1.0), event(2.0, 2, "train/loss", 0.5))
    assert [s.step for s in read_scalars(data[:-3])] == [1]


def test_attempts_merge_into_curves_with_restarts_marked() -> None:
    first = [Scalar("train/loss", s, 3.0 - 0.1 * s, 100.0 + s) for s in range(1, 8)]
    first += [Scalar("train/learning_rate", s, 1e-3, 100.0 + s) for s in range(1, 8)]
    first += [Scalar("eval/loss", 5, 2.9, 105.5)]
    # attempt 2 resumed from the checkpoint at step 5: it trains steps 6.. again, with other values
    second = [Scalar("train/loss", s, 2.0 - 0.1 * s, 500.0 + s) for s in range(6, 10)]
    unrelated = [Scalar("train/epoch", 1, 0.1, 50.0)]  # a file of other tags marks no restart
    data = curves([second, [], unrelated, first])
    assert data.train_loss == {
        **{s: 3.0 - 0.1 * s for s in range(1, 6)},
        **{s: 2.0 - 0.1 * s for s in range(6, 10)},
    }
    assert data.eval_loss == {5: 2.9}
    assert data.learning_rate == {s: 1e-3 for s in range(1, 8)}
    assert data.restarts == [6]
    assert data.to_dict()["trainLoss"][:2] == [[1, 2.9], [2, 2.8]]
