"""One training process (``python -m finetune_trainer worker``), started by torchrun per GPU.

The launcher has already staged this node (``<workdir>/staged.json``: local model, resume
checkpoint, data checked). A worker loads the data and the model, composes the method's recipe
with the checkpoint, signal and progress callbacks, trains, and publishes the adapter. Its exit code
and reason go to the launcher through ``$FTJ_EXIT_DIR``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from finetune_trainer import launch, signals
from finetune_trainer.errors import TrainerError
from finetune_trainer.progress import NullReporter, RateLimited, make_reporter
from finetune_trainer.runconfig import ExitCode, ProgressReport, RunConfig

log = logging.getLogger("finetune_trainer")

METRICS_FILE = "metrics.jsonl"
"""Global rank 0's log lines (loss, learning rate, ...) as JSONL in the workdir."""


def setup_logging(local_rank: int) -> None:
    """INFO from local rank 0 of each node, warnings and errors from the others."""
    level = logging.INFO if local_rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s [rank {os.environ.get('RANK', '0')}] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if local_rank != 0:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_run_config(path: Path) -> RunConfig:
    """Read and validate the run config; a broken one is INVALID_CONFIG with pydantic's field paths."""
    from pydantic import ValidationError

    try:
        return RunConfig.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise TrainerError(ExitCode.INVALID_CONFIG, f"cannot read the run config {path}: {exc}") from exc
    except ValidationError as exc:
        raise TrainerError(ExitCode.INVALID_CONFIG, f"invalid run config {path}: {exc}") from exc


def worker_main(config_path: Path, workdir: Path) -> int:
    """Run one worker; never raises: the outcome is the exit code plus a reason for the launcher."""
    from finetune_trainer.callbacks import Ranks

    ranks = Ranks.from_env()
    exit_dir = Path(os.environ.get(launch.EXIT_DIR_ENV) or workdir / "exit")
    launch.write_worker_pid(exit_dir, ranks.local_rank)
    signals.install()
    setup_logging(ranks.local_rank)
    reporter: RateLimited = RateLimited(NullReporter(), 0)
    attempt = 1
    reason = ""
    try:
        config = load_run_config(config_path)
        attempt = config.job.attempt
        if ranks.rank == 0:
            reporter = make_reporter(config.progress)
        code = _train(config, workdir, ranks, reporter)
    except Exception as exc:
        code, reason = classify(exc)
        if code == ExitCode.ERROR:
            log.exception("training failed")
        else:
            log.error("%s", reason)
    if code not in (ExitCode.OK, ExitCode.PREEMPTED) and ranks.rank == 0:
        reporter.report(ProgressReport(attempt=attempt, state="failed", message=reason[:1000], time=_now()))
    reporter.close()
    launch.write_worker_exit(exit_dir, ranks.local_rank, code, reason)
    _teardown()
    return int(code)


def classify(exc: BaseException) -> tuple[ExitCode, str]:
    """The exit code and reason of a failure (see runconfig.ExitCode for what the operator does)."""
    from finetune_trainer.data import DataSourceError
    from finetune_trainer.data_checks import DataValidationError
    from finetune_trainer.s3 import StorageError

    if isinstance(exc, TrainerError):
        return exc.code, str(exc)
    if isinstance(exc, DataValidationError):
        return ExitCode.INVALID_DATA, str(exc)
    if isinstance(exc, DataSourceError):
        return ExitCode.INPUT_UNREADABLE, str(exc)
    if isinstance(exc, StorageError):
        return (ExitCode.ERROR if exc.retryable else ExitCode.INPUT_UNREADABLE), str(exc)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: recurs at the same step
        return ExitCode.INVALID_CONFIG, (
            f"out of GPU memory ({exc}). Lower hyperparameters.perDeviceBatchSize or "
            "dataset.maxSeqLength, use quantization nf4, offload optimizer, or more GPUs."
        )
    return ExitCode.ERROR, f"{type(exc).__name__}: {exc}"


def _now() -> str:
    from finetune_trainer.progress import now_iso

    return now_iso()


def _teardown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # a peer that died first makes this fail; nothing is left to do
        log.debug("process group teardown: %s", exc)


def common_arguments(config: RunConfig, workdir: Path, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments fields every recipe uses (the method-specific ones are in the recipes)."""
    hp = config.hyperparameters
    args: dict[str, Any] = {
        "output_dir": str(workdir / "run"),
        "num_train_epochs": hp.epochs,
        "max_steps": hp.max_steps or -1,
        "learning_rate": hp.learning_rate,
        "per_device_train_batch_size": hp.per_device_batch_size,
        "per_device_eval_batch_size": hp.per_device_batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation,
        "warmup_steps": hp.warmup_ratio,  # transformers 5: a float below 1 is a fraction of all steps
        "lr_scheduler_type": hp.lr_scheduler,
        "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm,
        "seed": hp.seed,
        "data_seed": hp.seed,
        "logging_steps": hp.logging_steps,
        "save_strategy": "steps",
        "save_steps": config.checkpoints.every_steps,
        "save_total_limit": None,  # local copies are deleted once uploaded (CheckpointPublisher)
        "report_to": ["tensorboard"],
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,  # every adapter weight takes part in every step
    }
    if has_eval:
        args["eval_strategy"] = "steps"
        args["eval_steps"] = hp.eval_steps or config.checkpoints.every_steps
    return args


def _train(config: RunConfig, workdir: Path, ranks: Any, reporter: RateLimited) -> ExitCode:
    import torch

    from finetune_trainer import checkpoints, loader
    from finetune_trainer.callbacks import (
        CheckpointPublisher,
        MetricsFile,
        ProgressCallback,
        StopOnSignal,
        all_gather,
    )
    from finetune_trainer.data import load_datasets, make_token_counter
    from finetune_trainer.recipes import RecipeInputs, recipe_for
    from finetune_trainer.s3 import ObjectStore
    from finetune_trainer.stage import Staged, load_tokenizer

    staged = Staged.read(workdir)
    precision = loader.plan_precision(config, cuda_available=torch.cuda.is_available())
    if precision.on_gpu:
        torch.cuda.set_device(ranks.local_rank)
    loader.init_distributed(config, precision)
    store = ObjectStore(config.s3)
    ckpts = checkpoints.CheckpointStore(store, config.checkpoints.uri)
    progress: ProgressCallback | None = None
    if ranks.rank == 0:
        newest = [c for c in reversed(ckpts.scan()) if c.complete][: config.checkpoints.keep]
        progress = ProgressCallback(reporter, config.job.attempt, ckpts.events(newest))
        progress.send(state="initializing")

    tokenizer = load_tokenizer(Path(staged.model_dir))
    data = load_datasets(
        config.dataset,
        config.method,
        seed=config.hyperparameters.seed,
        store=store,
        token_counter=make_token_counter(tokenizer),
    )
    tensorboard_dir = workdir / "tensorboard"
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir)
    arguments = {
        **common_arguments(config, workdir, data.eval is not None),
        **loader.training_arguments(config, precision),
    }
    stopper = StopOnSignal()
    publisher = CheckpointPublisher(
        ckpts,
        ranks,
        keep=config.checkpoints.keep,
        fingerprint=checkpoints.fingerprint(
            config, world_size=ranks.world_size, data_sha256=staged.data_sha256
        ),
        attempt=config.job.attempt,
        tensorboard_dir=tensorboard_dir,
        progress=progress,
    )
    callbacks: list[Any] = [stopper, publisher]
    if progress is not None:
        callbacks += [progress, MetricsFile(workdir / METRICS_FILE)]
    recipe = recipe_for(config.method)
    inputs = RecipeInputs(
        load_model=lambda: loader.load_model(
            config, Path(staged.model_dir), precision, local_rank=ranks.local_rank
        ),
        tokenizer=tokenizer,
        train_dataset=data.train,
        eval_dataset=data.eval,
        peft_config=loader.lora_config(config),
        arguments=arguments,
        max_length=config.dataset.max_seq_length,
        packing=config.dataset.packing,
        beta=config.hyperparameters.beta,
        callbacks=callbacks,
    )
    trainer = recipe.build_trainer(inputs)
    publisher.flush_tensorboard = lambda: _flush_tensorboard(trainer)

    steps = all_gather(staged.resume_step)
    if len(set(steps)) != 1:
        raise TrainerError(ExitCode.ERROR, f"nodes staged different checkpoints to resume from: {steps}")
    if signals.agreed():
        log.warning("stop requested before training started")
        return ExitCode.PREEMPTED
    result = trainer.train(resume_from_checkpoint=staged.resume_dir)
    if stopper.stopped:
        return ExitCode.PREEMPTED

    _finish(trainer, result, config, data, store, ranks, workdir, publisher, progress)
    return ExitCode.OK


def _finish(
    trainer: Any,
    result: Any,
    config: RunConfig,
    data: Any,
    store: Any,
    ranks: Any,
    workdir: Path,
    publisher: Any,
    progress: Any,
) -> None:
    """After the last step: final metrics (and evaluation), the adapter to S3, the last report."""
    from finetune_trainer import output

    metrics = {"train_loss": float(result.training_loss)}
    last = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
    if last is not None:
        metrics["last_loss"] = float(last)
    if data.eval is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    adapter_uri = output.publish(trainer, config, data.report, store, ranks, workdir=workdir, metrics=metrics)
    if progress is not None:
        publisher.upload_tensorboard()
        progress.send(
            state="finished",
            step=trainer.state.global_step,
            adapter_uri=adapter_uri,
            eval_loss=metrics.get("eval_loss"),
        )


def _flush_tensorboard(trainer: Any) -> None:
    from transformers.integrations.integration_utils import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.flush()
