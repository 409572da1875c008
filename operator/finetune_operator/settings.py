"""Operator settings, read from the environment once at start and passed in (never a global).

Every setting is an ``FTJ_*`` environment variable of the operator's Deployment; the Helm chart
sets them from its values. :func:`from_env` is the only place that reads the environment, and it
names the variable and what it expects when a value is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"
DEFAULT_TRAINER_COMMAND = ("python", "-m", "finetune_trainer", "run")


class SettingsError(ValueError):
    """An FTJ_* environment variable has a value the operator cannot use."""


@dataclass(frozen=True)
class Settings:
    """What the operator needs to know that is not in a FineTuneJob."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """FTJ_TRAINER_IMAGE: image of the training pods when ``spec.resources.image`` is unset."""
    trainer_command: tuple[str, ...] = DEFAULT_TRAINER_COMMAND
    """FTJ_TRAINER_COMMAND: the pods' command, shell-split (the dev node agent overrides it)."""
    image_pull_policy: str = "IfNotPresent"
    """FTJ_IMAGE_PULL_POLICY: Always, IfNotPresent or Never."""
    default_s3_endpoint: str | None = None
    """FTJ_DEFAULT_S3_ENDPOINT: S3 endpoint when ``spec.storage.endpointUrl`` is unset."""
    default_s3_region: str | None = None
    """FTJ_DEFAULT_S3_REGION: S3 region when ``spec.storage.region`` is unset."""
    master_port: int = 29500
    """FTJ_MASTER_PORT: rendezvous port of rank 0."""
    termination_grace_seconds: int = 600
    """FTJ_TERMINATION_GRACE_SECONDS: time a pod gets after SIGTERM to upload a final checkpoint."""
    start_failure_grace_seconds: int = 120
    """FTJ_START_FAILURE_GRACE_SECONDS: how long a pod may fail to start (image pull, missing
    secret) before the FineTuneJob fails; InvalidImageName fails at once."""
    resync_seconds: float = 20.0
    """FTJ_RESYNC_SECONDS: reconcile every job at least this often when nothing else happened."""
    run_as_user: int = 1000
    """FTJ_RUN_AS_USER: uid (and gid) of the training pods; they never run as root."""
    progress_min_interval_seconds: float = 2.0
    """FTJ_PROGRESS_MIN_INTERVAL_SECONDS: how often rank 0 may patch the progress ConfigMap."""
    max_workers: int = 8
    """FTJ_MAX_WORKERS: reconciles running at once (kopf's thread pool)."""


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``FTJ_*`` variables (``os.environ`` when ``env`` is None)."""
    env = os.environ if env is None else env
    base = Settings()
    values: dict[str, object] = {}
    for field in dataclasses.fields(Settings):
        var = f"FTJ_{field.name.upper()}"
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        values[field.name] = _parse(var, raw, getattr(base, field.name))
    settings = dataclasses.replace(base, **values)  # type: ignore[arg-type]
    if settings.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
        raise SettingsError(
            f"FTJ_IMAGE_PULL_POLICY={settings.image_pull_policy!r}: use Always, IfNotPresent or Never"
        )
    return settings


def _parse(var: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, tuple):
            parts = tuple(shlex.split(raw))
            if not parts:
                raise ValueError("empty command")
            return parts
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            value: float = int(raw)
        elif isinstance(default, float):
            value = float(raw)
        else:
            return raw
    except ValueError as err:
        raise SettingsError(f"{var}={raw!r}: {err}; expected a {type(default).__name__}") from err
    if value <= 0:
        raise SettingsError(f"{var}={raw!r}: must be positive")
    return value
