"""ObjectStore against a real S3 server (SeaweedFS on 127.0.0.1): transfers, listing, errors, outages."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.runconfig import S3Config
from finetune_trainer.s3 import (
    AlreadyExists,
    MiB,
    NotFound,
    ObjectStore,
    RetryPolicy,
    StorageError,
    TransferSettings,
)

pytestmark = pytest.mark.trainer

SMALL_PARTS = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)


@pytest.fixture
def store(s3_server: S3Server) -> ObjectStore:
    return ObjectStore(env=s3_server.env(), transfer=SMALL_PARTS)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_small_file_round_trip(store: ObjectStore, s3_bucket: str, tmp_path: Path) -> None:
    src = write(tmp_path / "a.json", b'{"step": 3}')
    uri = f"s3://{s3_bucket}/ckpt/a.json"

    assert not store.exists(uri)
    assert store.upload_file(src, uri) == uri
    assert store.exists(uri)
    assert store.read_bytes(uri) == b'{"step": 3}'
    got = store.download_file(uri, tmp_path / "deep" / "down" / "a.json")
    assert got.read_bytes() == b'{"step": 3}'


def test_multipart_file_round_trip(
    store: ObjectStore, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(12 * MiB + 123)
    src = write(tmp_path / "shard.bin", data)
    uri = f"s3://{s3_bucket}/ckpt/shard.bin"

    store.upload_file(src, uri)

    head = s3_server.client().head_object(Bucket=s3_bucket, Key="ckpt/shard.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # three 5 MiB parts: it really went multipart
    down = store.download_file(uri, tmp_path / "back.bin")
    assert hashlib.sha256(down.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_directory_round_trip_keeps_the_layout(store: ObjectStore, s3_bucket: str, tmp_path: Path) -> None:
    files = {
        "adapter_config.json": b"{}",
        "adapter_model.safetensors": os.urandom(6 * MiB),  # multipart inside a directory upload
        "global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"rank0",
        "global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"rank1",
        "trainer_state.json": b'{"global_step": 3}',
    }
    for name, data in files.items():
        write(tmp_path / "src" / name, data)
    prefix = f"s3://{s3_bucket}/ns/job/step-000000003"

    uris = store.upload_dir(tmp_path / "src", prefix)

    assert uris == [f"{prefix}/{name}" for name in sorted(files)]
    assert store.list_keys(prefix + "/") == uris
    paths = store.download_prefix(prefix, tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in paths) == sorted(files)
    for name, data in files.items():
        assert (tmp_path / "dst" / name).read_bytes() == data


def test_a_prefix_is_a_folder_not_a_string_prefix(store: ObjectStore, s3_bucket: str, tmp_path: Path) -> None:
    for key in ("ckpt/step-1/a", "ckpt/step-10/a", "ckpt/step-1.tmp"):
        store.put_bytes(f"s3://{s3_bucket}/{key}", b"x")

    assert store.list_keys(f"s3://{s3_bucket}/ckpt/step-1") == [f"s3://{s3_bucket}/ckpt/step-1/a"]
    assert store.exists(f"s3://{s3_bucket}/ckpt/step-1/")
    assert not store.exists(f"s3://{s3_bucket}/ckpt/step-2/")
    assert [p.name for p in store.download_prefix(f"s3://{s3_bucket}/ckpt/step-1", tmp_path)] == ["a"]
    assert store.delete_prefix(f"s3://{s3_bucket}/ckpt/step-1") == 1
    assert store.list_keys(f"s3://{s3_bucket}/ckpt/") == [
        f"s3://{s3_bucket}/ckpt/step-1.tmp",
        f"s3://{s3_bucket}/ckpt/step-10/a",
    ]


def test_listing_follows_every_page(store: ObjectStore, s3_bucket: str) -> None:
    keys = [f"data/step-{i:09d}/part-{j}" for i in range(7) for j in range(4)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: store.put_bytes(f"s3://{s3_bucket}/{k}", k.encode()), keys))

    assert store.list_keys(f"s3://{s3_bucket}/data", page_size=5) == [f"s3://{s3_bucket}/{k}" for k in keys]
    assert store.list_prefixes(f"s3://{s3_bucket}/data/", page_size=2) == [
        f"s3://{s3_bucket}/data/step-{i:09d}/" for i in range(7)
    ]
    assert store.list_prefixes(f"s3://{s3_bucket}") == [f"s3://{s3_bucket}/data/"]


def test_delete_prefix_deletes_more_than_one_batch(store: ObjectStore, s3_bucket: str) -> None:
    keys = [f"old/k{i:05d}" for i in range(1100)]  # DeleteObjects takes 1000 keys per request
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(f"s3://{s3_bucket}/{k}", b""), keys))
    store.put_bytes(f"s3://{s3_bucket}/keep", b"")

    assert len(store.list_keys(f"s3://{s3_bucket}/old")) == 1100  # 2 pages of 1000
    assert store.delete_prefix(f"s3://{s3_bucket}/old/") == 1100
    assert store.list_keys(f"s3://{s3_bucket}/") == [f"s3://{s3_bucket}/keep"]
    assert store.delete_prefix(f"s3://{s3_bucket}/old/") == 0


def test_conditional_put_refuses_an_existing_key(store: ObjectStore, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/ckpt/step-000000200/COMPLETE"
    store.put_bytes(uri, b"first", if_none_match=True)

    with pytest.raises(AlreadyExists) as info:
        store.put_bytes(uri, b"second", if_none_match=True)

    assert info.value.retryable is False
    assert "already exists" in str(info.value)
    assert store.read_bytes(uri) == b"first"
    store.put_bytes(uri, b"third")  # an unconditional put overwrites
    assert store.read_bytes(uri) == b"third"


def test_delete_one_object(store: ObjectStore, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/ckpt/step-1/COMPLETE"
    store.put_bytes(uri, b"x")
    store.put_bytes(f"s3://{s3_bucket}/ckpt/step-1/other", b"y")

    store.delete(uri)
    store.delete(uri)  # already gone: fine

    assert not store.exists(uri)
    assert store.list_keys(f"s3://{s3_bucket}/ckpt/step-1/") == [f"s3://{s3_bucket}/ckpt/step-1/other"]


def test_missing_objects_and_buckets(store: ObjectStore, s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="no such object"):
        store.read_bytes(f"s3://{s3_bucket}/nope")
    with pytest.raises(NotFound, match="no such object"):
        store.download_file(f"s3://{s3_bucket}/nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()

    # SeaweedFS creates a missing bucket on PUT for its admin identity (AWS would answer NoSuchBucket),
    # so the missing bucket is shown by reading and listing.
    attempts: list[Callable[[], object]] = [
        lambda: store.read_bytes("s3://no-such-bucket-ftj/f"),
        lambda: store.list_keys("s3://no-such-bucket-ftj/ckpt/"),
    ]
    for attempt in attempts:
        started = time.monotonic()
        with pytest.raises(NotFound) as info:
            attempt()
        assert time.monotonic() - started < 5  # not retried
        assert info.value.retryable is False
        assert "bucket 'no-such-bucket-ftj' does not exist" in str(info.value)
        assert "Check the bucket name" in str(info.value)


def test_wrong_credentials_fail_fast_with_what_to_check(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
    store = ObjectStore(env=env, transfer=SMALL_PARTS)
    src = write(tmp_path / "big.bin", os.urandom(6 * MiB))

    attempts: list[Callable[[], object]] = [
        lambda: store.upload_file(src, f"s3://{s3_bucket}/big.bin"),  # multipart
        lambda: store.put_bytes(f"s3://{s3_bucket}/small", b"x"),
        lambda: store.list_keys(f"s3://{s3_bucket}/"),
    ]
    for attempt in attempts:
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            attempt()
        assert time.monotonic() - started < 5
        message = str(info.value)
        assert info.value.retryable is False
        assert "access refused" in message
        assert "Check the S3 credentials secret" in message
        assert s3_server.endpoint_url in message
        assert "wrong-secret-value" not in message


def test_endpoint_from_config_wins_over_the_environment(s3_server: S3Server, s3_bucket: str) -> None:
    env = {**s3_server.env(), "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    store = ObjectStore(S3Config(endpoint_url=s3_server.endpoint_url), env=env)
    store.put_bytes(f"s3://{s3_bucket}/k", b"v")
    assert store.read_bytes(f"s3://{s3_bucket}/k") == b"v"


def test_upload_survives_the_server_being_down_for_five_seconds(
    s3_server_private: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = s3_server_private
    bucket = server.make_bucket("outage")
    # One botocore attempt per request: the outer loop, not botocore, has to bridge the outage.
    store = ObjectStore(
        env=server.env(),
        transfer=SMALL_PARTS,
        retry=RetryPolicy(
            max_attempts=1, base_delay_s=0.5, max_delay_s=2, deadline_s=60, connect_timeout_s=2
        ),
    )
    data = os.urandom(11 * MiB)
    src = write(tmp_path / "shard.bin", data)
    outcome: list[BaseException | str] = []

    def upload() -> None:
        try:
            outcome.append(store.upload_file(src, f"s3://{bucket}/ckpt/shard.bin"))
        except BaseException as exc:
            outcome.append(exc)

    server.kill()
    caplog.set_level(logging.WARNING, logger="finetune_trainer.s3")
    worker = threading.Thread(target=upload)
    worker.start()
    time.sleep(5)
    assert worker.is_alive(), outcome  # still retrying, not failed
    server.start()
    worker.join(timeout=60)

    assert outcome == [f"s3://{bucket}/ckpt/shard.bin"]
    assert any("S3 upload of" in r.getMessage() and "retry" in r.getMessage() for r in caplog.records)
    assert store.read_bytes(f"s3://{bucket}/ckpt/shard.bin") == data


def test_an_unreachable_server_ends_in_a_retryable_error(s3_server_private: S3Server) -> None:
    server = s3_server_private
    store = ObjectStore(
        env=server.env(),
        retry=RetryPolicy(
            max_attempts=2, base_delay_s=0.2, max_delay_s=0.5, deadline_s=2, connect_timeout_s=1
        ),
    )
    server.kill()
    started = time.monotonic()

    with pytest.raises(StorageError) as info:
        store.read_bytes("s3://outage/anything")

    assert 2 <= time.monotonic() - started < 10
    assert info.value.retryable is True
    message = str(info.value)
    assert f"cannot reach the S3 endpoint {server.endpoint_url}" in message
    assert "gave up after" in message


def test_directory_upload_survives_a_kill_in_the_middle(s3_server_private: S3Server, tmp_path: Path) -> None:
    server = s3_server_private
    bucket = server.make_bucket("midway")
    store = ObjectStore(
        env=server.env(),
        transfer=TransferSettings(max_parallel_files=1),
        retry=RetryPolicy(
            max_attempts=1, base_delay_s=0.5, max_delay_s=2, deadline_s=60, connect_timeout_s=2
        ),
    )
    files = {f"shard-{i:03d}.bin": os.urandom(64 * 1024) for i in range(300)}
    for name, data in files.items():
        write(tmp_path / "src" / name, data)
    outcome: list[BaseException | list[str]] = []

    def upload() -> None:
        try:
            outcome.append(store.upload_dir(tmp_path / "src", f"s3://{bucket}/ckpt/"))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=upload)
    worker.start()
    client = server.client()
    deadline = time.monotonic() + 30
    while not client.list_objects_v2(Bucket=bucket, Prefix="ckpt/").get("KeyCount"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.kill()
    time.sleep(5)
    assert worker.is_alive(), outcome  # the kill came mid-upload, and the upload keeps retrying
    server.start()
    worker.join(timeout=120)

    assert outcome == [[f"s3://{bucket}/ckpt/{name}" for name in sorted(files)]]
    for name in ("shard-000.bin", "shard-150.bin", "shard-299.bin"):
        assert store.read_bytes(f"s3://{bucket}/ckpt/{name}") == files[name]
    assert len(store.list_keys(f"s3://{bucket}/ckpt/")) == 300
