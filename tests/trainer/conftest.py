"""Fixtures of the trainer tier: one tiny model per session, a real S3 server, run factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from finetune_devenv.s3server import S3Server
from tests.support.tiny_model import build_tiny_model
from tests.trainer.harness import TrainerProcess, make_config

NewRun = Callable[..., TrainerProcess]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama + tokenizer, built once per test session (about a second)."""
    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture
def tiny_model_s3(s3_server: S3Server, s3_bucket: str, tiny_model: Path) -> str:
    """The tiny model uploaded to the test's bucket; returns its s3:// folder URI."""
    client = s3_server.client()
    for path in sorted(tiny_model.iterdir()):
        client.upload_file(str(path), s3_bucket, f"models/tiny/{path.name}")
    return f"s3://{s3_bucket}/models/tiny/"


def s3_keys(server: S3Server, bucket: str, prefix: str) -> dict[str, int]:
    """Key -> size of every object under ``prefix``."""
    client = server.client()
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({obj["Key"]: obj["Size"] for obj in page.get("Contents", [])})
    return found


def make_run_factory(
    tmp_path: Path, server: S3Server, bucket: str, model_uri: str
) -> Callable[..., TrainerProcess]:
    def new_run(
        name: str = "job", *, pod: str = "pod", env: dict[str, str] | None = None, **changes: Any
    ) -> TrainerProcess:
        config = make_config(
            name=name,
            model_uri=model_uri,
            bucket=bucket,
            endpoint_url=server.endpoint_url,
            progress_path=tmp_path / name / "progress.json",
            **changes,
        )
        return TrainerProcess(tmp_path / name / pod, config, env={**server.env(), **(env or {})})

    return new_run


@pytest.fixture
def new_run(tmp_path: Path, s3_server: S3Server, s3_bucket: str, tiny_model: Path) -> NewRun:
    """``new_run(name, pod=..., **config_changes)``: a trainer "pod" for job ``name`` on the shared S3
    server. Pods of one job share the job's checkpoints and progress file, not their workdirs."""
    return make_run_factory(tmp_path, s3_server, s3_bucket, str(tiny_model))
