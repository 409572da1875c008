"""The FineTuneJob API (finetune.dev/v1alpha1): the one source of truth.

These pydantic models generate the CRD (``crds/finetunejobs.finetune.dev.yaml``, see ``crdgen``),
parse objects read from the API server, and document every field (descriptions become
``kubectl explain`` text and the API reference). Field names are camelCase on the wire, snake_case
in Python. Values left unset are resolved by :mod:`finetune_operator.defaults`, which knows the method
and model size; the schema carries only the bounds and enums (and, for fields with a fixed default,
that default: see ``crdgen`` for why).

Cross-field rules and immutability are CEL rules (``x-kubernetes-validations``) attached with
:func:`cel`, so the API server itself refuses a bad manifest and names the field. The API server
estimates the cost of every rule from the schema's bounds, so every string and list a rule can reach
carries a ``maxLength``/``maxItems``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION: Final = "finetune.dev/v1alpha1"
KIND: Final = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune"]

CEL_KEY = "x-kubernetes-validations"


def cel(*rules: tuple[str, str] | tuple[str, str, str] | tuple[str, str, str, str]) -> dict[str, Any]:
    """JSON-schema extra holding CEL rules: ``(rule, message[, fieldPath[, reason]])``.

    ``reason`` is the API's cause type (``FieldValueInvalid`` when unset, ``FieldValueForbidden``...).
    """
    keys = ("rule", "message", "fieldPath", "reason")
    return {CEL_KEY: [dict(zip(keys, r, strict=False)) for r in rules]}


class ApiModel(BaseModel):
    """Base for API models: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_attribute_docstrings=True
    )


# ------------------------------------------------------------------------------------ formats

_BUCKET = r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]"
_CLAIM = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
S3_OR_PVC = rf"^(s3://{_BUCKET}(/.*)?|pvc://{_CLAIM}/.*)$"
MODEL_URI = rf"^(s3://{_BUCKET}(/.*)?|hf://[^/\s]+/[^\s]+|pvc://{_CLAIM}/.*)$"
DATA_URI = MODEL_URI
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"  # the name part of a label key or resource name
EXTENDED_RESOURCE = rf"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/{_NAME}$"
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
URI_MAX = 1024


def _quantity_to_str(value: object) -> object:
    """``cpu: 8`` is as natural in YAML as ``cpu: "8"``; the API server keeps the int, we keep a str."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _quantity_schema(what: str) -> dict[str, Any]:
    """A Kubernetes quantity (int or string, as in a pod's resources), positive, checked by the API server."""
    return {
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "maxLength": 64,
        **cel(
            (
                "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))",
                f"{what} must be a positive Kubernetes quantity, for example 8, 500m, 64Gi",
            )
        ),
    }


_AS_STR, _FORMAT = BeforeValidator(_quantity_to_str), Field(pattern=QUANTITY, max_length=64)
CpuQuantity = Annotated[str, _AS_STR, _FORMAT, WithJsonSchema(_quantity_schema("cpu"))]
MemoryQuantity = Annotated[str, _AS_STR, _FORMAT, WithJsonSchema(_quantity_schema("memory"))]
ShmQuantity = Annotated[str, _AS_STR, _FORMAT, WithJsonSchema(_quantity_schema("shmSize"))]


# ---------------------------------------------------------------------------------------- spec


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    uri: str = Field(
        pattern=MODEL_URI,
        max_length=URI_MAX,
        description="Where the base model (Hugging Face layout: config.json, tokenizer, safetensors) is: "
        "s3://bucket/prefix/, hf://org/name (needs hub access from the pods) or pvc://claim/path.",
    )
    quantization: Literal["nf4", "none"] = Field(
        "nf4",
        description="nf4 loads the frozen base in 4-bit NF4 (QLoRA); none loads it in bf16 (LoRA).",
    )
    parameters_billions: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Size of the base model in billions of parameters. Used for size-aware defaults "
        "(learning rate) and planning; inferred from the URI (e.g. '70b') when omitted.",
    )


class AdapterSpec(ApiModel):
    """LoRA adapter settings."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.alpha) || !has(self.r) || self.alpha <= 16 * self.r",
                "adapter.alpha is more than 16 x adapter.r: the update scale alpha/r would make training "
                "diverge; lower alpha (alpha = r or 2 x r is usual) or raise r",
                ".alpha",
            ),
        )
    )

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[Annotated[str, Field(max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt (e.g. q_proj, v_proj), or ['all-linear'] for every linear "
        "layer except the output head.",
        json_schema_extra={
            "x-kubernetes-list-type": "set",
            **cel(
                (
                    "!('all-linear' in self) || size(self) == 1",
                    "all-linear already selects every linear layer: list it alone or name modules instead",
                )
            ),
        },
    )


class DatasetSpec(ApiModel):
    """Training (and evaluation) data, JSONL."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!(has(self.eval) && has(self.evalFraction))",
                "set either eval or evalFraction, not both",
                ".evalFraction",
            ),
        )
    )

    train: str = Field(
        pattern=DATA_URI,
        max_length=URI_MAX,
        description="JSONL with one example per line: chat messages, prompt/completion, "
        "instruction/input/output, or prompt/chosen/rejected (DPO). s3://, pvc:// or hf:// dataset id.",
    )
    eval: str | None = Field(None, pattern=DATA_URI, max_length=URI_MAX, description="Evaluation JSONL.")
    eval_fraction: float | None = Field(
        None, gt=0, le=0.5, description="Hold out this fraction of train for evaluation (instead of eval)."
    )
    format: Literal["auto", "messages", "prompt_completion", "instruction", "preference"] = Field(
        "auto",
        description="Record format; auto detects it from the first records. preference "
        "(prompt/chosen/rejected) is for method dpo, the others for sft.",
    )
    max_seq_length: int = Field(
        2048, ge=16, le=262144, description="Longest tokenised example; longer examples fail validation."
    )
    packing: bool = Field(
        False,
        description="Pack several short examples per sequence (SFT only; position ids keep them apart). "
        "Without packing, micro-batches are grouped by length to pad less.",
    )


class HyperparametersSpec(ApiModel):
    """Optimisation settings. Unset values get method- and size-aware defaults (see docs)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!(has(self.epochs) && has(self.maxSteps))",
                "set either epochs or maxSteps, not both (maxSteps would silently override epochs)",
                ".maxSteps",
            ),
        )
    )

    epochs: float | None = Field(None, gt=0, le=100, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, le=100_000_000, description="Stop after this many optimiser steps (instead of epochs)."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="Peak learning rate. Default: SFT 2e-4 (1e-4 from 30B), DPO 5e-6."
    )
    per_device_batch_size: int | None = Field(None, ge=1, le=1024, description="Micro-batch per GPU.")
    gradient_accumulation: int | None = Field(None, ge=1, le=4096, description="Micro-batches per step.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Fraction of steps warming up.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] | None = Field(
        None, description="Learning-rate schedule."
    )
    weight_decay: float | None = Field(None, ge=0, le=1, description="AdamW weight decay.")
    beta: float | None = Field(None, gt=0, le=10, description="DPO temperature (DPO only).")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Random seed.")
    gradient_checkpointing: bool | None = Field(None, description="Recompute activations (default on).")


class Toleration(ApiModel):
    """A pod toleration, as in the core API."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "a toleration without key must use operator Exists (it then tolerates every taint)",
                ".operator",
            ),
            (
                "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "operator Exists takes no value: remove value or use operator Equal",
                ".value",
            ),
            (
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds applies to effect NoExecute only",
                ".tolerationSeconds",
            ),
        )
    )

    key: str | None = Field(
        None,
        max_length=317,
        pattern=LABEL_KEY,
        description="Taint key; unset with operator Exists matches every taint.",
    )
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Equal (default) or Exists.")
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; all effects when unset."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="How long a NoExecute taint is tolerated before eviction."
    )


class ResourcesSpec(ApiModel):
    """Where and on what the training pods run."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.memory) || !has(self.shmSize) || !isQuantity(string(self.memory)) "
                "|| !isQuantity(string(self.shmSize)) "
                "|| !quantity(string(self.memory)).isGreaterThan(quantity('0')) "
                "|| quantity(string(self.shmSize)).isLessThan(quantity(string(self.memory)))",
                "shmSize must be smaller than memory: /dev/shm is counted against the pod's memory limit",
                ".shmSize",
            ),
        )
    )

    nodes: int = Field(1, ge=1, le=512, description="Pods (one per node) in the gang.")
    gpus_per_node: int = Field(
        1,
        ge=0,
        le=16,
        description="GPUs per pod; one training process each. 0 runs one process on the CPU "
        "(small models, the local demo).",
    )
    gpu_resource: str = Field(
        "nvidia.com/gpu",
        max_length=253,
        pattern=EXTENDED_RESOURCE,
        description="Extended resource name of the GPU (for example nvidia.com/gpu, amd.com/gpu).",
    )
    cpu: CpuQuantity | None = Field(None, description="CPU request and limit per pod (e.g. 32, 500m).")
    memory: MemoryQuantity | None = Field(None, description="Memory request and limit per pod (e.g. 512Gi).")
    shm_size: ShmQuantity = Field("16Gi", description="Size of /dev/shm (NCCL needs plenty).")
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels to require.",
        json_schema_extra=cel(
            (
                f"self.all(k, size(k) <= 317 && k.matches(r'{LABEL_KEY}'))",
                "every nodeSelector key must be a label key such as nvidia.com/gpu.product",
            )
        ),
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Tolerations.")
    priority_class_name: str | None = Field(
        None, max_length=253, pattern=DNS_SUBDOMAIN, description="Pod priority class."
    )
    image: str | None = Field(
        None,
        max_length=512,
        pattern=r"^[^\s]+$",
        description="Trainer image; the operator's default when unset.",
    )


class DistributedSpec(ApiModel):
    """DeepSpeed settings."""

    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage (3 shards everything).")
    offload: Literal["none", "optimizer", "all"] = Field(
        "none", description="Offload optimizer state (and parameters, with all) to CPU memory."
    )


class CheckpointSpec(ApiModel):
    """Checkpoints: where, how often, how many."""

    uri: str | None = Field(
        None,
        pattern=S3_OR_PVC,
        max_length=URI_MAX,
        description="Prefix; checkpoints go to <uri>/<namespace>/<name>/step-<n>/. Unset: the platform's "
        "default location (the operator's chart value defaults.checkpointUri); the job fails at start "
        "when there is none. Fixed once the job has started (resume reads from it); status.checkpointsUri "
        "shows the location in use.",
    )
    every_steps: int = Field(
        200, ge=1, le=10_000_000, description="Save every N optimiser steps (and on preemption)."
    )
    keep: int = Field(3, ge=1, le=100, description="Complete checkpoints kept; older ones are deleted.")


class OutputSpec(ApiModel):
    """Where the trained adapter goes."""

    uri: str = Field(
        pattern=S3_OR_PVC, max_length=URI_MAX, description="Prefix for adapter/ and manifest.json."
    )
    merge: bool = Field(False, description="Also write the base merged with the adapter (quantization none).")


class StorageSpec(ApiModel):
    """S3 endpoint settings (for S3-compatible stores)."""

    endpoint_url: str | None = Field(
        None, pattern=r"^https?://[^\s]+$", max_length=512, description="S3 endpoint URL; AWS when unset."
    )
    region: str | None = Field(None, max_length=64, pattern=r"^[a-z0-9-]+$", description="S3 region.")


class CredentialsSpec(ApiModel):
    """Secrets, by reference only: their values never enter the FineTuneJob, status or ConfigMaps."""

    s3_secret_ref: str | None = Field(
        None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optional "
        "AWS_SESSION_TOKEN), exposed to the trainer as environment variables.",
    )
    hf_token_secret_ref: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253, description="Secret with key HF_TOKEN, for hf:// models."
    )


class RunPolicySpec(ApiModel):
    """Restarts, deadlines, suspension and queueing. Editable at any time."""

    max_restarts: int = Field(
        3, ge=0, le=100, description="Failed attempts allowed (preemptions and evictions do not count)."
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=60,
        le=31_536_000,
        description="Fail the job when it has run longer than this, across attempts.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        le=31_536_000,
        description="Delete the FineTuneJob this long after it succeeded or failed.",
    )
    suspend: bool = Field(
        False,
        description="Stop the pods (after a final checkpoint) and wait; false resumes from the newest "
        "checkpoint. With queueName set, a suspended job also leaves the queue.",
    )
    queue_name: str | None = Field(
        None,
        pattern=DNS_LABEL,
        max_length=63,
        description="Kueue LocalQueue admitting the gang. Once the job has started, change it only "
        "together with suspend: true (as Kueue does).",
    )


TRAINING_FIELDS = ("method", "model", "adapter", "dataset", "hyperparameters", "resources", "distributed")
"""Spec fields fixed once a job has started: changing them would make resume train a different run."""

IMMUTABLE_AFTER_START = (*TRAINING_FIELDS, "checkpoints.uri")
"""Every spec path the API server refuses to change after start (a CEL rule on the root)."""


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "self.method == 'dpo' || !has(self.hyperparameters) || !has(self.hyperparameters.beta)",
                "hyperparameters.beta applies to method dpo only: remove it or set method: dpo",
                ".hyperparameters.beta",
            ),
            (
                "self.method != 'dpo' || !has(self.dataset.packing) || !self.dataset.packing",
                "dataset.packing is for sft only: set packing: false for dpo",
                ".dataset.packing",
            ),
            (
                "self.method == 'dpo' || !has(self.dataset.format) || self.dataset.format != 'preference'",
                "dataset.format preference (prompt/chosen/rejected) needs method: dpo",
                ".dataset.format",
            ),
            (
                "self.method != 'dpo' || !has(self.dataset.format) "
                "|| self.dataset.format in ['auto', 'preference']",
                "method dpo trains on prompt/chosen/rejected pairs: set dataset.format to preference or auto",
                ".dataset.format",
            ),
            (
                "!has(self.output.merge) || !self.output.merge "
                "|| (has(self.model.quantization) && self.model.quantization == 'none')",
                "output.merge needs model.quantization: none (a 4-bit base cannot be merged losslessly)",
                ".output.merge",
            ),
            (
                "!has(self.distributed) || !has(self.distributed.offload) "
                "|| self.distributed.offload != 'all' "
                "|| !has(self.distributed.zeroStage) || self.distributed.zeroStage == 3",
                "distributed.offload all (parameters too) needs zeroStage: 3",
                ".distributed.offload",
            ),
            (
                "!has(self.distributed) || !has(self.distributed.offload) "
                "|| self.distributed.offload == 'none' "
                "|| !has(self.resources) || !has(self.resources.gpusPerNode) "
                "|| self.resources.gpusPerNode > 0",
                "distributed.offload moves state from GPU to CPU memory: with resources.gpusPerNode 0 "
                "set offload: none",
                ".distributed.offload",
            ),
            (
                "!has(self.checkpoints) || !has(self.checkpoints.uri) "
                "|| (self.checkpoints.uri != self.output.uri "
                "&& self.checkpoints.uri + '/' != self.output.uri "
                "&& self.checkpoints.uri != self.output.uri + '/')",
                "output.uri must differ from checkpoints.uri: keep the trained adapter apart from "
                "checkpoints that get pruned",
                ".output.uri",
            ),
        )
    )

    method: Literal["sft", "dpo"] = Field("sft", description="sft (supervised) or dpo (preference pairs).")
    model: ModelSpec
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    dataset: DatasetSpec
    hyperparameters: HyperparametersSpec = Field(default_factory=HyperparametersSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)
    credentials: CredentialsSpec = Field(default_factory=CredentialsSpec)
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)


# ----------------------------------------------------------------------------------------------- status

Phase = Literal[
    "Pending",
    "Queued",
    "Initializing",
    "Running",
    "Restarting",
    "Suspended",
    "Succeeded",
    "Failed",
    "Cancelled",
]
FINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(max_length=316, description="Condition type, e.g. Ready, Progressing, Succeeded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        max_length=1024,
        description="CamelCase reason for the last transition.",
    )
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(None, ge=0, description="Spec generation this was set for.")


class RestartStatus(ApiModel):
    """Attempts restarted so far."""

    model_config = ConfigDict(extra="ignore")

    total: int = Field(0, ge=0, description="Restarts for any reason.")
    counted_towards_limit: int = Field(
        0, ge=0, description="Restarts counted against runPolicy.maxRestarts (failures, not preemptions)."
    )
    last_reason: str | None = Field(None, description="Why the last attempt ended, e.g. Preempted.")


class ProgressStatus(ApiModel):
    """Training progress reported by rank 0."""

    model_config = ConfigDict(extra="ignore")

    step: int = Field(0, ge=0, description="Optimiser steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimiser steps planned.")
    percent: int | None = Field(None, ge=0, le=100, description="step / totalSteps, in percent.")
    epoch: float | None = Field(None, ge=0, description="Passes over the data so far (fractional).")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated seconds to completion.")
    last_update_time: datetime | None = Field(None, description="When rank 0 last reported.")


class MetricsStatus(ApiModel):
    """Latest training metrics."""

    model_config = ConfigDict(extra="ignore")

    train_loss: float | None = Field(None, description="Training loss at the latest logged step.")
    eval_loss: float | None = Field(None, description="Loss on the evaluation data at the latest evaluation.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    tokens_per_second: float | None = Field(None, description="Training throughput over all ranks.")


class CheckpointStatus(ApiModel):
    """A checkpoint of this job."""

    model_config = ConfigDict(extra="ignore")

    step: int = Field(ge=0, description="Optimiser step the checkpoint holds.")
    uri: str = Field(description="Where it is (step-<n>/ under checkpoints.uri).")
    complete: bool = Field(True, description="Its completion marker exists: resume may use it.")
    time: datetime | None = Field(None, description="When it was completed.")


class OutputStatus(ApiModel):
    """What the job produced."""

    model_config = ConfigDict(extra="ignore")

    adapter_uri: str | None = Field(None, description="Where the trained adapter is.")


MAX_STATUS_CHECKPOINTS = 10


class FineTuneJobStatus(ApiModel):
    """Observed state, written by the operator only."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase = Field("Pending", description="Where the job is in its life cycle.")
    reason: str | None = Field(
        None, description="CamelCase reason for the phase (why it failed, is waiting)."
    )
    message: str | None = Field(None, description="Human-readable details: what happened, what to do.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready/Reconciling/Stalled (kstatus) and the job's own conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="Spec generation the status reflects.")
    attempt: int = Field(0, ge=0, description="Current attempt (1 for the first); 0 before the first starts.")
    restarts: RestartStatus = Field(default_factory=RestartStatus)
    progress: ProgressStatus = Field(default_factory=ProgressStatus)
    metrics: MetricsStatus = Field(default_factory=MetricsStatus)
    checkpoints: list[CheckpointStatus] = Field(
        default_factory=list,
        max_length=MAX_STATUS_CHECKPOINTS,
        description=f"Newest checkpoints, newest last (at most {MAX_STATUS_CHECKPOINTS}).",
    )
    output: OutputStatus = Field(default_factory=OutputStatus)
    checkpoints_uri: str | None = Field(
        None,
        description="The checkpoint location in use: spec.checkpoints.uri, or the platform's default when "
        "that is unset. Recorded when the first attempt is created and kept for the job's life, so a "
        "later change of the platform default never moves a started job; checkpoints are under "
        "<checkpointsUri>/<namespace>/<name>/.",
    )
    start_time: datetime | None = Field(
        None, description="When the first attempt started; from then on the training spec is fixed."
    )
    completion_time: datetime | None = Field(
        None, description="When the job succeeded, failed or was cancelled."
    )


# ------------------------------------------------------------------------------------------------- root

_STARTED = (
    "has(oldSelf.status) && (has(oldSelf.status.startTime) "
    "|| (has(oldSelf.status.attempt) && oldSelf.status.attempt >= 1))"
)


def _unchanged(path: str) -> str:
    """CEL: ``spec.<path>`` is the same in self and oldSelf, set or unset alike (parents may be unset)."""
    new_has, old_has, new, old = [], [], "self.spec", "oldSelf.spec"
    for part in path.split("."):
        new_has.append(f"has({new}.{part})")
        old_has.append(f"has({old}.{part})")
        new, old = f"{new}.{part}", f"{old}.{part}"
    new_set, old_set = " && ".join(new_has), " && ".join(old_has)
    return f"({new_set} && {old_set} && {new} == {old}) || (!({new_set}) && !({old_set}))"


def _immutable_after_start(path: str) -> tuple[str, str, str, str]:
    return (
        f"!({_STARTED}) || {_unchanged(path)}",
        "cannot change once the job has started: create a new FineTuneJob to train with other settings",
        f".spec.{path}",
        "FieldValueForbidden",
    )


_QUEUE_CHANGE = (
    f"!({_STARTED}) || {_unchanged('runPolicy.queueName')} "
    "|| (has(self.spec.runPolicy) && has(self.spec.runPolicy.suspend) && self.spec.runPolicy.suspend)",
    "can change after start only together with runPolicy.suspend: true "
    "(a running gang cannot move between queues)",
    ".spec.runPolicy.queueName",
    "FieldValueForbidden",
)


class FineTuneJob(ApiModel):
    """A fine-tuning run: one FineTuneJob, one trained adapter."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra=cel(*(_immutable_after_start(p) for p in IMMUTABLE_AFTER_START), _QUEUE_CHANGE),
    )

    api_version: Literal["finetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneJob"] = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)
