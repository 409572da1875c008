"""Operator settings, read from the environment once at start and passed in (never a global).

Every setting is an ``FTJ_*`` environment variable of the operator's Deployment; the Helm chart
sets them from its values. :func:`from_env` is the only place that reads the environment, and it
names the variable and what it expects when a value is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

import pydantic

from finetune_operator.api import HyperparametersSpec

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
    max_workers: int = 32
    """FTJ_MAX_WORKERS: reconciles running at once. Each waits on the API server almost all the time
    (docs/benchmarks.md): 32 kept 1000 jobs created at once within 1.0x of a plain client, 8 did not."""
    default_checkpoint_uri: str | None = None
    """FTJ_DEFAULT_CHECKPOINT_URI (chart: defaults.checkpointUri): an s3:// prefix used when a
    FineTuneJob sets no ``spec.checkpoints.uri``; recorded in the job's status at its first start."""
    defaults_sft: HyperparametersSpec = dataclasses.field(default_factory=HyperparametersSpec, hash=False)
    """FTJ_DEFAULTS_SFT (chart: defaults.methods.sft): JSON object of spec.hyperparameters fields
    for method sft, between the job's own values and the built-in size-aware defaults."""
    defaults_dpo: HyperparametersSpec = dataclasses.field(default_factory=HyperparametersSpec, hash=False)
    """FTJ_DEFAULTS_DPO (chart: defaults.methods.dpo): the same for method dpo."""

    def method_defaults(self, method: str) -> HyperparametersSpec:
        """The platform's hyperparameter defaults for ``method`` (sft or dpo)."""
        return self.defaults_dpo if method == "dpo" else self.defaults_sft


CHART_VALUES = {
    "default_checkpoint_uri": "defaults.checkpointUri",
    "defaults_sft": "defaults.methods.sft",
    "defaults_dpo": "defaults.methods.dpo",
}
"""Settings the chart sets from its ``defaults`` group; every other one is ``settings.<camelCase>``."""

DEFAULT_CHECKPOINT_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?$")
"""A platform-wide default must be a bucket: a pvc:// claim exists in one namespace only."""


def chart_value(field_name: str) -> str:
    """The chart value that sets a :class:`Settings` field (for error messages and the docs)."""
    camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), field_name)
    return CHART_VALUES.get(field_name, f"settings.{camel}")


def env_var(field_name: str) -> str:
    return f"FTJ_{field_name.upper()}"


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``FTJ_*`` variables (``os.environ`` when ``env`` is None)."""
    env = os.environ if env is None else env
    base = Settings()
    values: dict[str, object] = {}
    for field in dataclasses.fields(Settings):
        var = env_var(field.name)
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        where = f"{var} (chart value {chart_value(field.name)})"
        values[field.name] = _parse(where, raw, getattr(base, field.name))
    settings = dataclasses.replace(base, **values)  # type: ignore[arg-type]
    if settings.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
        raise SettingsError(
            f"FTJ_IMAGE_PULL_POLICY={settings.image_pull_policy!r}: use Always, IfNotPresent or Never"
        )
    uri = settings.default_checkpoint_uri
    if uri is not None and not DEFAULT_CHECKPOINT_URI.match(uri):
        raise SettingsError(
            f"FTJ_DEFAULT_CHECKPOINT_URI (chart value defaults.checkpointUri)={uri!r}: "
            "expected an s3://bucket/prefix/ URI"
        )
    for method in ("sft", "dpo"):
        _check_method_defaults(method, settings.method_defaults(method))
    return settings


def _check_method_defaults(method: str, hp: HyperparametersSpec) -> None:
    """The cross-field rules the API server applies to spec.hyperparameters (CEL), for the defaults."""
    where = f"{env_var('defaults_' + method)} (chart value defaults.methods.{method})"
    if hp.epochs is not None and hp.max_steps is not None:
        raise SettingsError(f"{where}: set either epochs or maxSteps, not both")
    if method != "dpo" and hp.beta is not None:
        raise SettingsError(f"{where}: beta applies to method dpo only; remove it")


def _hyperparameters(where: str, raw: str) -> HyperparametersSpec:
    try:
        return HyperparametersSpec.model_validate(json.loads(raw))
    except ValueError as err:  # json.JSONDecodeError and pydantic.ValidationError are ValueErrors
        if isinstance(err, pydantic.ValidationError):
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(the value)'}: {e['msg']}" for e in err.errors()
            )
        else:
            problems = f"not JSON ({err})"
        raise SettingsError(
            f"{where}: {problems}; expected a JSON object of spec.hyperparameters fields, "
            'for example {"learningRate": 1e-4, "epochs": 2}'
        ) from None


def _parse(var: str, raw: str, default: object) -> object:
    if isinstance(default, HyperparametersSpec):
        return _hyperparameters(var, raw)
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
