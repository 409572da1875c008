"""Operator settings from the environment (finetune_operator.settings)."""

from __future__ import annotations

import pytest

from finetune_operator.settings import DEFAULT_TRAINER_COMMAND, Settings, SettingsError, from_env

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
