"""Which checkpoint a new attempt resumes from (stage._resume_candidates)."""

from __future__ import annotations

import pytest

from finetune_trainer.checkpoints import CheckpointInfo, CheckpointStore
from finetune_trainer.errors import TrainerError
from finetune_trainer.runconfig import ExitCode, RunConfig
from finetune_trainer.stage import _resume_candidates

pytestmark = pytest.mark.unit

ROOT = "s3://ckpt/ns/j/"


class ListedCheckpoints(CheckpointStore):
    """The listing of a bucket, without a bucket: (step, complete) pairs."""

    def __init__(self, *steps: tuple[int, bool]) -> None:
        super().__init__(store=None, root=ROOT)  # type: ignore[arg-type]
        self._infos = [CheckpointInfo(s, self.step_uri(s), c) for s, c in steps]

    def scan(self) -> list[CheckpointInfo]:
        return sorted(self._infos, key=lambda c: c.step)


def config(resume_from: str | None) -> RunConfig:
    return RunConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "j"},
            "method": "sft",
            "model": {"uri": "s3://models/llama/"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "checkpoints": {"uri": ROOT, "resume_from": resume_from},
            "output": {"uri": "s3://out/j/"},
        }
    )


@pytest.mark.parametrize(
    ("listing", "resume_from", "expected"),
    [
        ([], None, []),
        ([(10, True), (20, True), (30, False)], None, [20, 10]),  # torn 30 never chosen
        ([(10, True), (20, True)], ROOT + "step-000000010/", [20, 10]),  # newer than named wins
        ([(20, True), (30, True)], ROOT + "step-000000010/", [30, 20]),  # named one pruned by keep
        ([(10, True), (20, False)], ROOT + "step-000000010", [10]),  # without the trailing slash
    ],
)
def test_resume_candidates(
    listing: list[tuple[int, bool]], resume_from: str | None, expected: list[int]
) -> None:
    assert _resume_candidates(config(resume_from), ListedCheckpoints(*listing)) == expected


@pytest.mark.parametrize(
    ("listing", "resume_from", "message"),
    [
        ([(10, False)], ROOT + "step-000000010/", "no completion marker"),
        ([(10, True)], "s3://elsewhere/step-000000010/", "is not a step-<9 digits>/ folder"),
        ([(10, True)], ROOT + "checkpoint-10/", "is not a step-<9 digits>/ folder"),
    ],
)
def test_resume_from_that_cannot_be_honoured_is_a_config_error(
    listing: list[tuple[int, bool]], resume_from: str, message: str
) -> None:
    with pytest.raises(TrainerError) as err:
        _resume_candidates(config(resume_from), ListedCheckpoints(*listing))
    assert err.value.code == ExitCode.INVALID_CONFIG
    assert message in str(err.value)
