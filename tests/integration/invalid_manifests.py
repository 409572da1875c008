"""A catalogue of broken FineTuneJob manifests and what the API server must answer to each.

Every entry is a mutation of :func:`base_manifest` (valid, and touching most fields so that a
mutation has something to break), the field path the API server's error must name, and a fragment
of its message. ``after_start`` entries are updates of a job whose status says it has started
(the CEL immutability rules); the others are creations. ``test_crd_validation`` applies each with
``kubectl apply --validate=strict`` against a real API server. A user reading the error should know
which field to fix and how, so the fragments are the parts of the message that say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Manifest = dict[str, Any]
Mutation = Callable[[Manifest], None]


def base_manifest(name: str) -> Manifest:
    """A valid SFT job using most fields."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "method": "sft",
            "model": {"uri": "s3://models/llama-3.1-8b-instruct/", "quantization": "nf4"},
            "adapter": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
            "dataset": {
                "train": "s3://data/support/train.jsonl",
                "eval": "s3://data/support/eval.jsonl",
                "format": "messages",
                "maxSeqLength": 2048,
            },
            "hyperparameters": {"epochs": 1, "learningRate": 2.0e-4},
            "resources": {
                "nodes": 1,
                "gpusPerNode": 1,
                "cpu": 8,
                "memory": "64Gi",
                "shmSize": "16Gi",
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "priorityClassName": "training",
            },
            "distributed": {"zeroStage": 3, "offload": "none"},
            "checkpoints": {"uri": "s3://ckpt/", "everySteps": 100, "keep": 3},
            "output": {"uri": "s3://out/base/"},
            "storage": {"endpointUrl": "https://s3.example.com", "region": "eu-west-1"},
            "credentials": {"s3SecretRef": "s3-creds", "hfTokenSecretRef": "hf-token"},
            "runPolicy": {"maxRestarts": 3, "activeDeadlineSeconds": 86400, "queueName": "team-a"},
        },
    }


# ------------------------------------------------------------------------------ mutations


def _walk(manifest: Manifest, path: str) -> tuple[Any, str | int]:
    """The container holding the last element of ``path`` (dots; integers index lists) and its key."""
    *parents, last = (int(p) if p.isdigit() else p for p in path.split("."))
    node: Any = manifest
    for part in parents:
        node = node[part]
    return node, last


def set_(path: str, value: Any) -> Mutation:
    def mutate(manifest: Manifest) -> None:
        node, key = _walk(manifest, path)
        node[key] = value

    return mutate


def delete(path: str) -> Mutation:
    def mutate(manifest: Manifest) -> None:
        node, key = _walk(manifest, path)
        del node[key]

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(manifest: Manifest) -> None:
        for m in mutations:
            m(manifest)

    return mutate


@dataclass(frozen=True)
class Invalid:
    name: str
    mutate: Mutation
    field: str
    """Path the error names, as the API server writes it (``spec.resources.tolerations[0].key``)."""
    message: str
    """A fragment of the message about that field."""
    after_start: bool = False

    def manifest(self, name: str) -> Manifest:
        manifest = base_manifest(name)
        self.mutate(manifest)
        return manifest


def _i(name: str, mutate: Mutation, field: str, message: str) -> Invalid:
    return Invalid(name, mutate, field, message)


def _started(
    name: str, mutate: Mutation, field: str, message: str = "cannot change once the job has started"
) -> Invalid:
    return Invalid(name, mutate, field, message, after_start=True)


DPO = both(set_("spec.method", "dpo"), set_("spec.dataset.format", "preference"))
_LONG_URI = "s3://bucket/" + "x" * 1100

CASES: list[Invalid] = [
    # -- wrong types
    _i(
        "nodes-not-integer",
        set_("spec.resources.nodes", "two"),
        "spec.resources.nodes",
        "must be of type integer",
    ),
    _i("method-not-string", set_("spec.method", 1), "spec.method", "must be of type string"),
    _i(
        "packing-not-boolean",
        set_("spec.dataset.packing", "yes"),
        "spec.dataset.packing",
        "must be of type boolean",
    ),
    _i(
        "learning-rate-not-number",
        set_("spec.hyperparameters.learningRate", "fast"),
        "spec.hyperparameters.learningRate",
        "must be of type number",
    ),
    _i(
        "target-modules-not-list",
        set_("spec.adapter.targetModules", "q_proj"),
        "spec.adapter.targetModules",
        "must be of type array",
    ),
    _i("model-not-object", set_("spec.model", "s3://models/x/"), "spec.model", "must be of type object"),
    _i(
        "tolerations-not-list",
        set_("spec.resources.tolerations", "all"),
        "spec.resources.tolerations",
        "must be of type array",
    ),
    # -- numbers out of bounds
    _i("nodes-zero", set_("spec.resources.nodes", 0), "spec.resources.nodes", "greater than or equal to 1"),
    _i(
        "nodes-too-many",
        set_("spec.resources.nodes", 513),
        "spec.resources.nodes",
        "less than or equal to 512",
    ),
    _i(
        "gpus-negative",
        set_("spec.resources.gpusPerNode", -1),
        "spec.resources.gpusPerNode",
        "greater than or equal to 0",
    ),
    _i(
        "gpus-too-many",
        set_("spec.resources.gpusPerNode", 17),
        "spec.resources.gpusPerNode",
        "less than or equal to 16",
    ),
    _i("rank-zero", set_("spec.adapter.r", 0), "spec.adapter.r", "greater than or equal to 1"),
    _i("dropout-one", set_("spec.adapter.dropout", 1.0), "spec.adapter.dropout", "less than 1"),
    _i(
        "learning-rate-zero",
        set_("spec.hyperparameters.learningRate", 0),
        "spec.hyperparameters.learningRate",
        "greater than 0",
    ),
    _i(
        "epochs-zero", set_("spec.hyperparameters.epochs", 0), "spec.hyperparameters.epochs", "greater than 0"
    ),
    _i(
        "eval-fraction-too-big",
        both(delete("spec.dataset.eval"), set_("spec.dataset.evalFraction", 0.9)),
        "spec.dataset.evalFraction",
        "less than or equal to 0.5",
    ),
    _i(
        "max-seq-length-tiny",
        set_("spec.dataset.maxSeqLength", 8),
        "spec.dataset.maxSeqLength",
        "greater than or equal to 16",
    ),
    _i("keep-zero", set_("spec.checkpoints.keep", 0), "spec.checkpoints.keep", "greater than or equal to 1"),
    _i(
        "max-restarts-too-many",
        set_("spec.runPolicy.maxRestarts", 101),
        "spec.runPolicy.maxRestarts",
        "less than or equal to 100",
    ),
    _i(
        "deadline-too-short",
        set_("spec.runPolicy.activeDeadlineSeconds", 30),
        "spec.runPolicy.activeDeadlineSeconds",
        "greater than or equal to 60",
    ),
    _i(
        "seed-negative",
        set_("spec.hyperparameters.seed", -1),
        "spec.hyperparameters.seed",
        "greater than or equal to 0",
    ),
    # -- enums
    _i("method-unknown", set_("spec.method", "orpo"), "spec.method", 'supported values: "sft", "dpo"'),
    _i(
        "quantization-unknown",
        set_("spec.model.quantization", "int8"),
        "spec.model.quantization",
        'supported values: "nf4", "none"',
    ),
    _i(
        "zero-stage-4",
        set_("spec.distributed.zeroStage", 4),
        "spec.distributed.zeroStage",
        "Unsupported value",
    ),
    _i(
        "offload-nvme",
        set_("spec.distributed.offload", "nvme"),
        "spec.distributed.offload",
        'supported values: "none", "optimizer", "all"',
    ),
    _i("format-csv", set_("spec.dataset.format", "csv"), "spec.dataset.format", "Unsupported value"),
    _i(
        "scheduler-unknown",
        set_("spec.hyperparameters.lrScheduler", "step"),
        "spec.hyperparameters.lrScheduler",
        "Unsupported value",
    ),
    _i(
        "toleration-effect-unknown",
        set_("spec.resources.tolerations.0.effect", "NoRun"),
        "spec.resources.tolerations[0].effect",
        "Unsupported value",
    ),
    # -- URIs
    _i(
        "model-uri-http", set_("spec.model.uri", "http://example.com/model"), "spec.model.uri", "should match"
    ),
    _i("model-uri-no-scheme", set_("spec.model.uri", "/models/llama"), "spec.model.uri", "should match"),
    _i(
        "train-uri-file",
        set_("spec.dataset.train", "file:///data/train.jsonl"),
        "spec.dataset.train",
        "should match",
    ),
    _i(
        "checkpoints-uri-hf",
        set_("spec.checkpoints.uri", "hf://org/ckpt"),
        "spec.checkpoints.uri",
        "should match",
    ),
    _i(
        "output-bucket-uppercase",
        set_("spec.output.uri", "s3://My_Bucket/out/"),
        "spec.output.uri",
        "should match",
    ),
    _i(
        "endpoint-not-http",
        set_("spec.storage.endpointUrl", "ftp://s3.example.com"),
        "spec.storage.endpointUrl",
        "should match",
    ),
    # -- unknown fields (kubectl's default --validate=strict asks the server to refuse them)
    _i("unknown-spec-field", set_("spec.modle", {"uri": "s3://models/x/"}), "spec.modle", "unknown field"),
    _i("unknown-nested-field", set_("spec.adapter.rank", 8), "spec.adapter.rank", "unknown field"),
    # -- missing required fields
    _i("no-spec", delete("spec"), "spec", "Required value"),
    _i("no-model", delete("spec.model"), "spec.model", "Required value"),
    _i("no-model-uri", delete("spec.model.uri"), "spec.model.uri", "Required value"),
    _i("no-train", delete("spec.dataset.train"), "spec.dataset.train", "Required value"),
    _i("no-output-uri", delete("spec.output.uri"), "spec.output.uri", "Required value"),
    # -- cross-field rules
    _i(
        "eval-and-eval-fraction",
        set_("spec.dataset.evalFraction", 0.1),
        "spec.dataset.evalFraction",
        "set either eval or evalFraction, not both",
    ),
    _i(
        "beta-without-dpo",
        set_("spec.hyperparameters.beta", 0.1),
        "spec.hyperparameters.beta",
        "applies to method dpo only",
    ),
    _i(
        "packing-with-dpo",
        both(DPO, set_("spec.dataset.packing", True)),
        "spec.dataset.packing",
        "packing is for sft only",
    ),
    _i(
        "preference-format-with-sft",
        set_("spec.dataset.format", "preference"),
        "spec.dataset.format",
        "needs method: dpo",
    ),
    _i(
        "messages-format-with-dpo",
        set_("spec.method", "dpo"),
        "spec.dataset.format",
        "set dataset.format to preference or auto",
    ),
    _i(
        "merge-with-nf4",
        set_("spec.output.merge", True),
        "spec.output.merge",
        "needs model.quantization: none",
    ),
    _i(
        "offload-all-without-zero3",
        both(set_("spec.distributed.offload", "all"), set_("spec.distributed.zeroStage", 2)),
        "spec.distributed.offload",
        "needs zeroStage: 3",
    ),
    _i(
        "offload-on-cpu-only",
        both(set_("spec.distributed.offload", "optimizer"), set_("spec.resources.gpusPerNode", 0)),
        "spec.distributed.offload",
        "with resources.gpusPerNode 0 set offload: none",
    ),
    _i(
        "output-is-checkpoints",
        set_("spec.output.uri", "s3://ckpt"),
        "spec.output.uri",
        "output.uri must differ from checkpoints.uri",
    ),
    _i(
        "epochs-and-max-steps",
        set_("spec.hyperparameters.maxSteps", 1000),
        "spec.hyperparameters.maxSteps",
        "set either epochs or maxSteps",
    ),
    _i(
        "alpha-way-above-rank",
        set_("spec.adapter.alpha", 1024),
        "spec.adapter.alpha",
        "more than 16 x adapter.r",
    ),
    _i(
        "all-linear-with-others",
        set_("spec.adapter.targetModules", ["all-linear", "q_proj"]),
        "spec.adapter.targetModules",
        "list it alone",
    ),
    _i(
        "target-module-twice",
        set_("spec.adapter.targetModules", ["q_proj", "q_proj"]),
        "spec.adapter.targetModules[1]",
        "Duplicate value",
    ),
    _i(
        "toleration-no-key-equal",
        set_("spec.resources.tolerations.0", {"operator": "Equal", "value": "x"}),
        "spec.resources.tolerations[0].operator",
        "must use operator Exists",
    ),
    _i(
        "toleration-exists-with-value",
        set_("spec.resources.tolerations.0.value", "yes"),
        "spec.resources.tolerations[0].value",
        "operator Exists takes no value",
    ),
    _i(
        "toleration-seconds-not-noexecute",
        set_("spec.resources.tolerations.0.tolerationSeconds", 60),
        "spec.resources.tolerations[0].tolerationSeconds",
        "applies to effect NoExecute only",
    ),
    _i(
        "shm-bigger-than-memory",
        set_("spec.resources.shmSize", "128Gi"),
        "spec.resources.shmSize",
        "shmSize must be smaller than memory",
    ),
    # -- quantities
    _i(
        "cpu-not-quantity",
        set_("spec.resources.cpu", "eight"),
        "spec.resources.cpu",
        "cpu must be a positive Kubernetes quantity",
    ),
    _i(
        "memory-negative",
        set_("spec.resources.memory", "-1Gi"),
        "spec.resources.memory",
        "memory must be a positive Kubernetes quantity",
    ),
    _i(
        "cpu-zero",
        set_("spec.resources.cpu", 0),
        "spec.resources.cpu",
        "must be a positive Kubernetes quantity",
    ),
    # -- names
    _i(
        "secret-name-uppercase",
        set_("spec.credentials.s3SecretRef", "S3_Creds"),
        "spec.credentials.s3SecretRef",
        "should match",
    ),
    _i(
        "hf-secret-name-slash",
        set_("spec.credentials.hfTokenSecretRef", "ns/hf-token"),
        "spec.credentials.hfTokenSecretRef",
        "should match",
    ),
    _i(
        "priority-class-space",
        set_("spec.resources.priorityClassName", "high priority"),
        "spec.resources.priorityClassName",
        "should match",
    ),
    _i(
        "queue-name-too-long",
        set_("spec.runPolicy.queueName", "q" * 64),
        "spec.runPolicy.queueName",
        "Too long",
    ),
    _i(
        "node-selector-bad-key",
        set_("spec.resources.nodeSelector", {"bad key!": "x"}),
        "spec.resources.nodeSelector",
        "must be a label key",
    ),
    _i(
        "node-selector-bad-value",
        set_("spec.resources.nodeSelector", {"zone": "eu west"}),
        "spec.resources.nodeSelector.zone",
        "should match",
    ),
    _i(
        "gpu-resource-no-domain",
        set_("spec.resources.gpuResource", "gpu"),
        "spec.resources.gpuResource",
        "should match",
    ),
    _i(
        "image-with-space",
        set_("spec.resources.image", "trainer: latest"),
        "spec.resources.image",
        "should match",
    ),
    # -- sizes
    _i("model-uri-huge", set_("spec.model.uri", _LONG_URI), "spec.model.uri", "Too long"),
    _i("eval-uri-huge", set_("spec.dataset.eval", _LONG_URI), "spec.dataset.eval", "Too long"),
    _i(
        "target-modules-too-many",
        set_("spec.adapter.targetModules", [f"m{i}" for i in range(65)]),
        "spec.adapter.targetModules",
        "Too many",
    ),
    _i(
        "tolerations-too-many",
        set_("spec.resources.tolerations", [{"key": f"k{i}", "operator": "Exists"} for i in range(33)]),
        "spec.resources.tolerations",
        "Too many",
    ),
    _i(
        "node-selector-too-many",
        set_("spec.resources.nodeSelector", {f"k{i}": "v" for i in range(33)}),
        "spec.resources.nodeSelector",
        "Too many",
    ),
    _i(
        "target-module-name-huge",
        set_("spec.adapter.targetModules", ["m" * 129]),
        "spec.adapter.targetModules[0]",
        "Too long",
    ),
    # -- the training spec is fixed once the job has started
    _started("changed-method", DPO, "spec.method"),
    _started("changed-model-uri", set_("spec.model.uri", "s3://models/other/"), "spec.model"),
    _started("changed-quantization", set_("spec.model.quantization", "none"), "spec.model"),
    _started("changed-adapter-rank", set_("spec.adapter.r", 8), "spec.adapter"),
    _started("changed-train-data", set_("spec.dataset.train", "s3://data/other.jsonl"), "spec.dataset"),
    _started(
        "changed-learning-rate", set_("spec.hyperparameters.learningRate", 1e-4), "spec.hyperparameters"
    ),
    _started("removed-hyperparameters", delete("spec.hyperparameters"), "spec.hyperparameters"),
    _started("changed-nodes", set_("spec.resources.nodes", 2), "spec.resources"),
    _started("changed-zero-stage", set_("spec.distributed.zeroStage", 2), "spec.distributed"),
    _started("changed-checkpoint-uri", set_("spec.checkpoints.uri", "s3://ckpt2/"), "spec.checkpoints.uri"),
    _started("removed-checkpoint-uri", delete("spec.checkpoints.uri"), "spec.checkpoints.uri"),
    _started(
        "changed-queue-while-running",
        set_("spec.runPolicy.queueName", "team-b"),
        "spec.runPolicy.queueName",
        "only together with runPolicy.suspend: true",
    ),
]

EDITABLE_AFTER_START: dict[str, Mutation] = {
    "suspend": set_("spec.runPolicy.suspend", True),
    "max-restarts": set_("spec.runPolicy.maxRestarts", 10),
    "deadline": set_("spec.runPolicy.activeDeadlineSeconds", 172800),
    "ttl": set_("spec.runPolicy.ttlSecondsAfterFinished", 3600),
    "keep": set_("spec.checkpoints.keep", 5),
    "every-steps": set_("spec.checkpoints.everySteps", 50),
    "queue-while-suspended": both(
        set_("spec.runPolicy.suspend", True), set_("spec.runPolicy.queueName", "team-b")
    ),
    "credentials": set_("spec.credentials.s3SecretRef", "s3-creds-rotated"),
    "output": set_("spec.output.uri", "s3://out/elsewhere/"),
}
"""Changes a running job accepts: the run policy, checkpoint retention, credentials, output."""
