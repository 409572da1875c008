"""The one exception type that carries an exit code from deep inside the trainer to its edge."""

from __future__ import annotations

from finetune_trainer.runconfig import ExitCode


class TrainerError(Exception):
    """A failure whose exit code is known; ``str(error)`` is the reason shown to the user."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
