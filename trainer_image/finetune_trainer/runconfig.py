"""The contract between the operator and the trainer.

The operator renders a :class:`RunConfig` from a FineTuneJob into a ConfigMap; every training pod
reads it back. The trainer reports through :class:`ProgressReport` messages and ends with one of the
:class:`ExitCode` values, which the operator classifies. This module imports no torch and no client
library, so both sides (and the CLI) can import it cheaply.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RUN_CONFIG_ENV = "FTJ_RUN_CONFIG"
"""Environment variable holding the path of the run config JSON inside a pod."""

RUN_CONFIG_FILE = "run-config.json"
"""Key of the run config in the rendered ConfigMap (and file name when mounted)."""

PROGRESS_KEY = "progress.json"
"""Key of the latest :class:`ProgressReport` in the per-job progress ConfigMap."""

CHECKPOINT_MARKER = "COMPLETE"
"""Object written last, by global rank 0, once every node uploaded its part of a checkpoint."""

TERMINATION_LOG = "/dev/termination-log"


class ExitCode(enum.IntEnum):
    """Exit codes of ``python -m finetune_trainer``; the operator decides retry or fail from these."""

    OK = 0
    ERROR = 1  # unexpected error: retryable, counted against maxRestarts
    INVALID_DATA = 3  # dataset failed validation: non-retryable
    INVALID_CONFIG = 4  # run config or model incompatible with the request: non-retryable
    INPUT_UNREADABLE = 5  # model, dataset or S3 input missing or access refused: non-retryable
    PREEMPTED = 143  # SIGTERM received, final checkpoint written: retry, not counted

    @property
    def retryable(self) -> bool:
        return self in (ExitCode.ERROR, ExitCode.PREEMPTED)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobRef(_Model):
    namespace: str
    name: str
    uid: str = ""
    attempt: int = Field(1, ge=1)


class ModelConfig(_Model):
    uri: str = Field(description="s3://bucket/prefix/, hf://org/name, pvc://claim/path or a local path")
    quantization: Literal["nf4", "none"] = "nf4"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class AdapterConfig(_Model):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


DatasetFormat = Literal["auto", "messages", "prompt_completion", "instruction", "preference"]


class DatasetConfig(_Model):
    train: str
    eval: str | None = None
    eval_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    format: DatasetFormat = "auto"
    max_seq_length: int = Field(2048, ge=16)
    packing: bool = False
    min_examples: int = Field(1, ge=1)


class Hyperparameters(_Model):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    per_device_batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    beta: float = Field(0.1, gt=0)  # DPO temperature
    seed: int = 42
    gradient_checkpointing: bool = True
    logging_steps: int = Field(1, ge=1)
    eval_steps: int | None = Field(None, ge=1)


class DistributedConfig(_Model):
    nodes: int = Field(1, ge=1)
    procs_per_node: int = Field(1, ge=1, description="one process per GPU; on CPU, processes per pod")
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload: Literal["none", "optimizer", "all"] = "none"
    master_port: int = 29500
    rdzv_timeout_seconds: int = 900


class CheckpointConfig(_Model):
    uri: str = Field(description="prefix for this job: <checkpoints.uri>/<namespace>/<name>/")
    every_steps: int = Field(200, ge=1)
    keep: int = Field(3, ge=1)
    resume_from: str | None = Field(
        None, description="complete checkpoint to resume from; None means find the newest complete one"
    )


class OutputConfig(_Model):
    uri: str
    merge: bool = False


class S3Config(_Model):
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"


class ProgressConfig(_Model):
    """Where rank 0 reports. ``configmap`` patches ``<namespace>/<name>`` with the pod's own token."""

    transport: Literal["configmap", "file", "none"] = "configmap"
    namespace: str = ""
    name: str = ""
    path: str | None = None
    min_interval_seconds: float = Field(2.0, ge=0)


class RunConfig(_Model):
    """Everything one attempt of a FineTuneJob needs to train; rendered by the operator."""

    version: Literal["v1"] = "v1"
    job: JobRef
    method: Literal["sft", "dpo"]
    model: ModelConfig
    adapter: AdapterConfig = AdapterConfig()
    dataset: DatasetConfig
    hyperparameters: Hyperparameters = Hyperparameters()
    distributed: DistributedConfig = DistributedConfig()
    checkpoints: CheckpointConfig
    output: OutputConfig
    s3: S3Config = S3Config()
    progress: ProgressConfig = ProgressConfig(transport="none")
    device: Literal["auto", "cuda", "cpu"] = "auto"


STATUS_MAX = 10**18
"""Largest count a progress report may carry: the status stores int64 (about 9.2e18)."""


class CheckpointEvent(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    step: int = Field(ge=0, le=STATUS_MAX)
    uri: str
    complete: bool = True
    time: str


class ProgressReport(BaseModel):
    """What rank 0 writes (JSON) under :data:`PROGRESS_KEY` in the job's progress ConfigMap.

    Each report is a whole snapshot (latest values win), so a lost patch loses nothing that the
    next one does not carry. ``checkpoints`` holds the newest complete checkpoints (bounded).
    """

    # NaN and Infinity are not JSON the API server accepts (the trainer's own JSON writes them as
    # null), so a report carrying them is unreadable too.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)

    # Bounds match the status fields these mirror: a report that does not fit the status is
    # unreadable (observe.parse_progress) instead of failing every reconcile of its job.
    attempt: int = Field(ge=1, le=STATUS_MAX)
    state: Literal["initializing", "training", "checkpointing", "finished", "failed"]
    step: int = Field(0, ge=0, le=STATUS_MAX)
    total_steps: int | None = Field(None, ge=0, le=STATUS_MAX, alias="totalSteps")
    epoch: float | None = Field(None, ge=0, le=STATUS_MAX)
    train_loss: float | None = Field(None, alias="trainLoss")
    eval_loss: float | None = Field(None, alias="evalLoss")
    learning_rate: float | None = Field(None, alias="learningRate")
    tokens_per_second: float | None = Field(None, alias="tokensPerSecond")
    # the trainer's estimate; else the operator's
    eta_seconds: float | None = Field(None, le=STATUS_MAX, alias="etaSeconds")
    checkpoints: list[CheckpointEvent] = []
    adapter_uri: str | None = Field(None, alias="adapterUri")
    message: str | None = None
    time: str
