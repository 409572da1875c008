"""Operator settings from the environment (finetune_operator.settings)."""

from __future__ import annotations

import pytest

from finetune_operator.api import HyperparametersSpec
from finetune_operator.settings import (
    DEFAULT_TRAINER_COMMAND,
    Settings,
    SettingsError,
    chart_value,
    from_env,
)

pytestmark = pytest.mark.unit


def test_defaults_without_environment() -> None:
    assert from_env({}) == Settings()
    assert Settings().trainer_command == DEFAULT_TRAINER_COMMAND


def test_values_are_parsed_by_type() -> None:
    settings = from_env(
        {
            "FTJ_TRAINER_IMAGE": "registry.local/trainer:2",
            "FTJ_TRAINER_COMMAND": "python -m finetune_devenv.nodeagent.shim --flag 'a b'",
            "FTJ_DEFAULT_S3_ENDPOINT": "http://127.0.0.1:9000",
            "FTJ_MASTER_PORT": "29600",
            "FTJ_RESYNC_SECONDS": "2.5",
            "FTJ_IMAGE_PULL_POLICY": "Never",
            "FTJ_UNRELATED": "ignored",
        }
    )
    assert settings.trainer_image == "registry.local/trainer:2"
    assert settings.trainer_command == ("python", "-m", "finetune_devenv.nodeagent.shim", "--flag", "a b")
    assert settings.default_s3_endpoint == "http://127.0.0.1:9000"
    assert settings.master_port == 29600
    assert settings.resync_seconds == 2.5
    assert settings.image_pull_policy == "Never"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FTJ_MASTER_PORT", "http"),
        ("FTJ_RESYNC_SECONDS", "-1"),
        ("FTJ_TERMINATION_GRACE_SECONDS", "0"),
        ("FTJ_IMAGE_PULL_POLICY", "Sometimes"),
        ("FTJ_TRAINER_COMMAND", "   "),
    ],
)
def test_bad_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError, match=var):
        from_env({var: value})


# ------------------------------------------------------------------- platform defaults for jobs


def test_default_checkpoint_uri_and_method_defaults_are_parsed() -> None:
    settings = from_env(
        {
            "FTJ_DEFAULT_CHECKPOINT_URI": "s3://platform-checkpoints/",
            "FTJ_DEFAULTS_SFT": '{"learningRate": 1e-4, "epochs": 2}',
            "FTJ_DEFAULTS_DPO": '{"beta": 0.2, "maxSteps": 500}',
        }
    )
    assert settings.default_checkpoint_uri == "s3://platform-checkpoints/"
    assert settings.method_defaults("sft") == HyperparametersSpec(learning_rate=1e-4, epochs=2)
    assert settings.method_defaults("dpo") == HyperparametersSpec(beta=0.2, max_steps=500)
    assert Settings().method_defaults("sft") == HyperparametersSpec(), "none by default"


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("FTJ_DEFAULT_CHECKPOINT_URI", "platform-checkpoints", "defaults.checkpointUri"),
        ("FTJ_DEFAULT_CHECKPOINT_URI", "pvc://claim/ckpt/", "s3://"),  # a claim lives in one namespace
        ("FTJ_DEFAULTS_SFT", '{"learningRate": 2}', "learningRate"),
        ("FTJ_DEFAULTS_SFT", '{"learningrate": 1e-4}', "learningrate"),
        ("FTJ_DEFAULTS_SFT", '{"lrScheduler": "step"}', "lrScheduler"),
        ("FTJ_DEFAULTS_SFT", "learningRate: 1e-4", "not JSON"),
        ("FTJ_DEFAULTS_SFT", "[1e-4]", "JSON object"),
        ("FTJ_DEFAULTS_SFT", '{"beta": 0.1}', "beta applies to method dpo only"),
        ("FTJ_DEFAULTS_DPO", '{"epochs": 1, "maxSteps": 10}', "not both"),
        ("FTJ_DEFAULTS_DPO", '{"perDeviceBatchSize": 0}', "perDeviceBatchSize"),
    ],
)
def test_bad_platform_defaults_stop_the_operator_naming_variable_value_and_field(
    var: str, value: str, named: str
) -> None:
    chart_value = {
        "FTJ_DEFAULT_CHECKPOINT_URI": "defaults.checkpointUri",
        "FTJ_DEFAULTS_SFT": "defaults.methods.sft",
        "FTJ_DEFAULTS_DPO": "defaults.methods.dpo",
    }[var]
    with pytest.raises(SettingsError) as caught:
        from_env({var: value})
    assert var in str(caught.value) and chart_value in str(caught.value)
    assert named in str(caught.value)


def test_every_setting_names_its_chart_value() -> None:
    assert chart_value("trainer_image") == "settings.trainerImage"
    assert chart_value("progress_min_interval_seconds") == "settings.progressMinIntervalSeconds"
    assert chart_value("defaults_dpo") == "defaults.methods.dpo"
