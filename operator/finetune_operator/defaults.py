"""Method- and size-aware hyperparameter defaults.

A value set in ``spec.hyperparameters`` always wins. Next come the platform's defaults for the
method (``FTJ_DEFAULTS_SFT``/``FTJ_DEFAULTS_DPO``, chart values ``defaults.methods.*``). What is
still unset is chosen from the method and the model size, because one learning rate does not fit
all: DPO moves a policy that is already good and learns about 40x slower than SFT, and LoRA on a
70B base wants half the rate of an 8B one.

| method | size     | learning rate | epochs | warmup | tokens per micro-batch |
|--------|----------|---------------|--------|--------|------------------------|
| sft    | < 30B    | 2e-4          | 3      | 0.03   | 16k (< 10B), 8k        |
| sft    | >= 30B   | 1e-4          | 3      | 0.03   | 4k                     |
| dpo    | any      | 5e-6          | 1      | 0.1    | same, halved (pairs)   |

The micro-batch is as many sequences of ``maxSeqLength`` as fit the token budget (at least 1);
gradient accumulation then reaches a global batch of about 64 sequences (SFT) or 32 pairs (DPO).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from finetune_operator.api import FineTuneJobSpec, HyperparametersSpec
from finetune_trainer.runconfig import Hyperparameters

LARGE_MODEL_BILLIONS = 30.0


@dataclass(frozen=True)
class MethodDefaults:
    learning_rate: float
    large_model_learning_rate: float
    epochs: float
    warmup_ratio: float
    global_batch: int
    token_budget_divisor: int


METHOD_DEFAULTS = {
    "sft": MethodDefaults(2e-4, 1e-4, 3.0, 0.03, 64, 1),
    "dpo": MethodDefaults(5e-6, 5e-6, 1.0, 0.1, 32, 2),
}

_SIZE_IN_URI = re.compile(r"(?<![a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)b(?![a-z0-9])")


def model_size_billions(spec: FineTuneJobSpec) -> float | None:
    """``model.parametersBillions``, else the size in the URI (``llama-3.1-70b`` -> 70), else None.

    A mixture like ``8x7b`` counts as 8 * 7: the defaults then err on the side of the larger model.
    """
    if spec.model.parameters_billions is not None:
        return spec.model.parameters_billions
    found = _SIZE_IN_URI.findall(spec.model.uri.lower())
    if not found:
        return None
    experts, size = found[-1]
    return float(size) * (int(experts) if experts else 1)


def _token_budget(size: float | None) -> int:
    if size is None or size < 10:
        return 16384
    if size < LARGE_MODEL_BILLIONS:
        return 8192
    return 4096


STEP_LIMITS = frozenset({"epochs", "max_steps"})
"""One choice, not two fields: a job that sets either takes neither from the platform."""


def merge_platform_defaults(spec: HyperparametersSpec, platform: HyperparametersSpec) -> HyperparametersSpec:
    """The job's hyperparameters with what it leaves unset taken from the platform's defaults."""
    own = spec.model_dump(exclude_none=True)
    taken = {k: v for k, v in platform.model_dump(exclude_none=True).items() if k not in own}
    if STEP_LIMITS & own.keys():
        taken = {k: v for k, v in taken.items() if k not in STEP_LIMITS}
    return HyperparametersSpec.model_validate({**taken, **own})


def resolve_hyperparameters(
    spec: FineTuneJobSpec, platform: HyperparametersSpec | None = None
) -> Hyperparameters:
    """The complete hyperparameters for the trainer: the spec's values, then the platform's defaults
    for the method (``platform``), then the built-in method- and size-aware ones."""
    hp = spec.hyperparameters if platform is None else merge_platform_defaults(spec.hyperparameters, platform)
    method = METHOD_DEFAULTS[spec.method]
    size = model_size_billions(spec)
    large = size is not None and size >= LARGE_MODEL_BILLIONS

    world = spec.resources.nodes * max(spec.resources.gpus_per_node, 1)
    budget = _token_budget(size) // method.token_budget_divisor
    batch = hp.per_device_batch_size or max(1, min(16, budget // spec.dataset.max_seq_length))
    accumulation = hp.gradient_accumulation or max(1, math.ceil(method.global_batch / (batch * world)))

    learning_rate = hp.learning_rate or (method.large_model_learning_rate if large else method.learning_rate)
    values = {
        "epochs": hp.epochs if hp.epochs is not None else method.epochs,
        "max_steps": hp.max_steps,
        "learning_rate": learning_rate,
        "per_device_batch_size": batch,
        "gradient_accumulation": accumulation,
        "warmup_ratio": hp.warmup_ratio if hp.warmup_ratio is not None else method.warmup_ratio,
        "lr_scheduler": hp.lr_scheduler or "cosine",
        "weight_decay": hp.weight_decay if hp.weight_decay is not None else 0.0,
        "beta": hp.beta if hp.beta is not None else 0.1,
        "seed": hp.seed if hp.seed is not None else 42,
        "gradient_checkpointing": hp.gradient_checkpointing
        if hp.gradient_checkpointing is not None
        else True,
    }
    return Hyperparameters.model_validate(values)
