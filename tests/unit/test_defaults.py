"""Method- and size-aware hyperparameter defaults (finetune_operator.defaults)."""

from __future__ import annotations

import pytest

from finetune_operator.defaults import model_size_billions, resolve_hyperparameters
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
