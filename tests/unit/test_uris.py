"""URI parsing: every accepted form, and a clear refusal for everything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer.uris import Uri, join, parse_uri, s3_uri

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/key.jsonl", Uri("s3", "s3://bucket/key.jsonl", bucket="bucket", key="key.jsonl")),
        ("s3://my.bucket-1/a/b/", Uri("s3", "s3://my.bucket-1/a/b/", bucket="my.bucket-1", key="a/b/")),
        ("s3://bucket", Uri("s3", "s3://bucket", bucket="bucket", key="")),
        ("s3://bucket/", Uri("s3", "s3://bucket/", bucket="bucket", key="")),
        ("hf://org/name", Uri("hf", "hf://org/name", repo_id="org/name")),
        ("hf://gpt2", Uri("hf", "hf://gpt2", repo_id="gpt2")),
        ("hf://org/name@main", Uri("hf", "hf://org/name@main", repo_id="org/name", revision="main")),
        (
            "hf://meta-llama/Llama-3.1-8B@refs/pr/1",
            Uri(
                "hf",
                "hf://meta-llama/Llama-3.1-8B@refs/pr/1",
                repo_id="meta-llama/Llama-3.1-8B",
                revision="refs/pr/1",
            ),
        ),
        ("file:///data/train.jsonl", Uri("file", "file:///data/train.jsonl", path=Path("/data/train.jsonl"))),
        ("/data/train.jsonl", Uri("file", "/data/train.jsonl", path=Path("/data/train.jsonl"))),
        ("rel/train.jsonl", Uri("file", "rel/train.jsonl", path=Path("rel/train.jsonl"))),
    ],
)
def test_parse_accepted_forms(uri: str, expected: Uri) -> None:
    assert parse_uri(uri) == expected


def test_pvc_maps_under_the_mount_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTJ_PVC_ROOT", raising=False)
    parsed = parse_uri("pvc://models/llama/8b")
    assert (parsed.scheme, parsed.path, parsed.is_local) == ("pvc", Path("/mnt/pvc/models/llama/8b"), True)
    assert parse_uri("pvc://models").path == Path("/mnt/pvc/models")
    monkeypatch.setenv("FTJ_PVC_ROOT", "/volumes")
    assert parse_uri("pvc://data/train.jsonl").local_path() == Path("/volumes/data/train.jsonl")
    assert parse_uri("pvc://data/x", pvc_root="/r").path == Path("/r/data/x")


def test_remote_uris_have_no_local_path() -> None:
    parsed = parse_uri("s3://bucket/key")
    assert not parsed.is_local
    with pytest.raises(ValueError, match="not a local path"):
        parsed.local_path()


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("", "empty"),
        (" s3://bucket/key", "whitespace"),
        ("gs://bucket/key", "unsupported scheme 'gs'"),
        ("s3://", "bucket name is missing"),
        ("s3:///key", "bucket name is missing"),
        ("s3://My_Bucket/key", "not a valid bucket name"),
        ("s3://ab/key", "not a valid bucket name"),
        ("s3://bucket//key", "empty path segment"),
        ("hf://", "org/name"),
        ("hf://a/b/c", "org/name"),
        ("hf://org/name@", "revision after '@' is empty"),
        ("pvc://Bad_Claim/x", "not a valid PersistentVolumeClaim name"),
        ("pvc://claim/../etc", "'..'"),
        ("file://", "path is empty"),
    ],
)
def test_refusals_name_the_uri_and_the_accepted_forms(uri: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_uri(uri)
    message = str(info.value)
    assert why in message
    assert repr(uri) in message
    assert "s3://bucket/key, hf://org/name[@revision], pvc://claim/path" in message


@pytest.mark.parametrize(
    ("prefix", "parts", "expected"),
    [
        ("s3://b/ckpt", ("ns", "job"), "s3://b/ckpt/ns/job"),
        ("s3://b/ckpt/", ("/ns/", "job", "step-1/"), "s3://b/ckpt/ns/job/step-1/"),
        ("s3://b", ("a//", "", "b"), "s3://b/a/b"),
        ("s3://b/x/", (), "s3://b/x/"),
        ("s3://b/x", ("",), "s3://b/x"),
        ("/tmp/out", ("adapter", "model.safetensors"), "/tmp/out/adapter/model.safetensors"),
        ("", ("a", "b/"), "a/b/"),
        ("s3://b/x", ("a", "/"), "s3://b/x/a/"),
    ],
)
def test_join(prefix: str, parts: tuple[str, ...], expected: str) -> None:
    assert join(prefix, *parts) == expected


def test_s3_uri() -> None:
    assert s3_uri("b", "k/v") == "s3://b/k/v"
    assert parse_uri(s3_uri("bucket", "a/b")).key == "a/b"
