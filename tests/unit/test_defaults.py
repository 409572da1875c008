"""Method- and size-aware hyperparameter defaults (finetune_operator.defaults)."""

from __future__ import annotations

import pytest

from finetune_operator.api import HyperparametersSpec
from finetune_operator.defaults import merge_platform_defaults, model_size_billions, resolve_hyperparameters
from finetune_operator.render import run_config
from finetune_operator.settings import Settings
from tests.support.builders import make_job

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "billions", "expected"),
    [
        ("s3://models/llama-3.1-70b-instruct/", None, 70.0),
        ("hf://meta-llama/Llama-3.1-8B-Instruct", None, 8.0),
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", None, 0.5),
        ("hf://mistralai/Mixtral-8x7B-v0.1", None, 56.0),
        ("s3://models/phi-3-mini-4k/", None, None),
        ("s3://models/llama-3.1-70b-instruct/", 8.0, 8.0),  # the spec wins over the URI
        ("pvc://models/gemma-2b", None, 2.0),
    ],
)
def test_model_size(uri: str, billions: float | None, expected: float | None) -> None:
    assert model_size_billions(make_job().model(uri, billions).build().spec) == expected


@pytest.mark.parametrize(
    ("method", "uri", "learning_rate", "epochs", "warmup"),
    [
        ("sft", "s3://models/llama-3.1-8b/", 2e-4, 3.0, 0.03),
        ("sft", "s3://models/qwen2.5-14b/", 2e-4, 3.0, 0.03),
        ("sft", "s3://models/qwen2.5-32b/", 1e-4, 3.0, 0.03),
        ("sft", "s3://models/llama-3.1-70b/", 1e-4, 3.0, 0.03),
        ("sft", "s3://models/unknown/", 2e-4, 3.0, 0.03),
        ("dpo", "s3://models/llama-3.1-8b/", 5e-6, 1.0, 0.1),
        ("dpo", "s3://models/llama-3.1-70b/", 5e-6, 1.0, 0.1),
    ],
)
def test_method_and_size_defaults(
    method: str, uri: str, learning_rate: float, epochs: float, warmup: float
) -> None:
    builder = make_job().model(uri)
    spec = (builder.dpo() if method == "dpo" else builder.sft()).build().spec
    hp = resolve_hyperparameters(spec)
    assert (hp.learning_rate, hp.epochs, hp.warmup_ratio) == (learning_rate, epochs, warmup)
    assert hp.gradient_checkpointing is True
    assert hp.beta == 0.1


@pytest.mark.parametrize(
    ("uri", "seq", "nodes", "gpus", "batch", "accumulation"),
    [
        ("s3://models/llama-3.1-8b/", 2048, 1, 1, 8, 8),  # 16k tokens / 2048 = 8; 64 / 8 = 8
        ("s3://models/llama-3.1-8b/", 512, 1, 1, 16, 4),  # capped at 16
        ("s3://models/llama-3.1-70b/", 4096, 2, 8, 1, 4),  # 4k tokens -> 1; 64 / 16 = 4
        ("s3://models/llama-3.1-70b/", 8192, 8, 8, 1, 1),  # world of 64 reaches the global batch
        ("s3://models/qwen2.5-14b/", 2048, 1, 4, 4, 4),
        ("s3://models/tiny/", 4096, 1, 0, 4, 16),  # gpusPerNode 0 -> one CPU process
    ],
)
def test_batch_fits_tokens_and_reaches_global_batch(
    uri: str, seq: int, nodes: int, gpus: int, batch: int, accumulation: int
) -> None:
    spec = make_job().model(uri).seq_len(seq).nodes(nodes).gpus(gpus).build().spec
    hp = resolve_hyperparameters(spec)
    assert (hp.per_device_batch_size, hp.gradient_accumulation) == (batch, accumulation)


def test_dpo_halves_the_micro_batch_for_pairs() -> None:
    sft = resolve_hyperparameters(make_job().seq_len(2048).build().spec)
    dpo = resolve_hyperparameters(make_job().dpo().seq_len(2048).build().spec)
    assert dpo.per_device_batch_size == sft.per_device_batch_size // 2


def test_values_in_the_spec_win() -> None:
    spec = (
        make_job()
        .dpo()
        .model("s3://models/llama-3.1-70b/")
        .hyper(
            learningRate=1e-6,
            epochs=2,
            perDeviceBatchSize=2,
            gradientAccumulation=3,
            warmupRatio=0.0,
            lrScheduler="linear",
            weightDecay=0.01,
            beta=0.3,
            seed=7,
            gradientCheckpointing=False,
            maxSteps=100,
        )
        .build()
        .spec
    )
    hp = resolve_hyperparameters(spec)
    assert hp.learning_rate == 1e-6
    assert hp.epochs == 2
    assert (hp.per_device_batch_size, hp.gradient_accumulation) == (2, 3)
    assert hp.warmup_ratio == 0.0
    assert hp.lr_scheduler == "linear"
    assert hp.weight_decay == 0.01
    assert hp.beta == 0.3
    assert hp.seed == 7
    assert hp.gradient_checkpointing is False
    assert hp.max_steps == 100


# --------------------------------------------------------------- the platform's defaults per method

PLATFORM_SFT = HyperparametersSpec(learning_rate=1e-4, epochs=2, warmup_ratio=0.05, per_device_batch_size=4)


@pytest.mark.parametrize(
    ("own", "expected"),
    [
        # (the job's spec.hyperparameters, (learning rate, epochs, max steps, warmup, micro-batch))
        ({}, (1e-4, 2.0, None, 0.05, 4)),  # the platform's value over the built-in one
        ({"learningRate": 3e-4}, (3e-4, 2.0, None, 0.05, 4)),  # the job's value over the platform's
        ({"epochs": 5}, (1e-4, 5.0, None, 0.05, 4)),
        # maxSteps replaces the platform's epochs (the built-in epochs stay; the trainer's maxSteps wins)
        ({"maxSteps": 100}, (1e-4, 3.0, 100, 0.05, 4)),
        ({"warmupRatio": 0.0}, (1e-4, 2.0, None, 0.0, 4)),  # 0 is a value, not "unset"
    ],
)
def test_precedence_job_then_platform_then_built_in(
    own: dict[str, object], expected: tuple[object, ...]
) -> None:
    spec = make_job().model("s3://models/llama-3.1-8b/").hyper(**own).build().spec
    hp = resolve_hyperparameters(spec, PLATFORM_SFT)
    assert (hp.learning_rate, hp.epochs, hp.max_steps, hp.warmup_ratio, hp.per_device_batch_size) == expected
    assert hp.lr_scheduler == "cosine" and hp.seed == 42, "the rest stays built-in"


def test_platform_max_steps_yields_to_the_jobs_epochs() -> None:
    spec = make_job().hyper(epochs=1).build().spec
    hp = resolve_hyperparameters(spec, HyperparametersSpec(max_steps=1000))
    assert (hp.epochs, hp.max_steps) == (1.0, None)


def test_merge_keeps_the_job_and_platform_models_untouched() -> None:
    own = HyperparametersSpec(seed=1)
    merged = merge_platform_defaults(own, PLATFORM_SFT)
    assert (merged.seed, merged.learning_rate) == (1, 1e-4)
    assert own == HyperparametersSpec(seed=1) and PLATFORM_SFT.seed is None


def test_the_run_config_carries_the_effective_hyperparameters() -> None:
    """What users read in the attempt's run-config ConfigMap: the values the trainer uses."""
    settings = Settings(defaults_sft=PLATFORM_SFT, defaults_dpo=HyperparametersSpec(learning_rate=1e-6))
    sft = run_config(make_job().build(), 1, None, settings)
    dpo = run_config(make_job().dpo().build(), 1, None, settings)
    assert (sft.hyperparameters.learning_rate, sft.hyperparameters.epochs) == (1e-4, 2.0)
    assert (dpo.hyperparameters.learning_rate, dpo.hyperparameters.epochs) == (1e-6, 1.0)
