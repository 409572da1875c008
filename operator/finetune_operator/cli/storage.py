"""S3 for the CLI: the trainer's own ObjectStore (one implementation), with short retries.

Credentials come from the standard AWS variables of the user's environment; the endpoint from
``--s3-endpoint``, else the FineTuneJob's ``spec.storage.endpointUrl``, else ``AWS_ENDPOINT_URL_S3``
/ ``AWS_ENDPOINT_URL``, else AWS.
"""

from __future__ import annotations

import argparse
from typing import Any

from finetune_operator import api
from finetune_operator.cli.errors import CliError
from finetune_operator.render import NoCheckpointLocation, checkpoint_prefix
from finetune_trainer.runconfig import S3Config
from finetune_trainer.s3 import ObjectStore, RetryPolicy, StorageError

# A person waits at a prompt: give up after seconds, not the trainer's ten minutes.
CLI_RETRY = RetryPolicy(
    deadline_s=15.0, base_delay_s=0.5, max_delay_s=4.0, max_attempts=3, connect_timeout_s=5.0
)


def add_s3_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 endpoint (default: the job's spec.storage.endpointUrl, else $AWS_ENDPOINT_URL_S3, "
        "else AWS); credentials come from the AWS_* environment variables",
    )


def endpoint_for(args: argparse.Namespace, spec: dict[str, Any] | None = None) -> str | None:
    """``--s3-endpoint`` wins over the job's ``spec.storage.endpointUrl``."""
    given: str | None = getattr(args, "s3_endpoint", None)
    if given:
        return given
    storage = (spec or {}).get("storage") or {}
    url = storage.get("endpointUrl")
    return str(url) if url else None


def object_store(endpoint: str | None, region: str | None = None) -> ObjectStore:
    return ObjectStore(S3Config(endpoint_url=endpoint, region=region), retry=CLI_RETRY)


def storage_error(exc: StorageError) -> CliError:
    return CliError(
        str(exc).rstrip("."),
        "check the URI, --s3-endpoint and the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in your environment",
    )


def started_checkpoint_prefix(job: api.FineTuneJob) -> str:
    """Where a job in the cluster keeps its checkpoints; a clear error before it has a location."""
    try:
        return checkpoint_prefix(job)
    except NoCheckpointLocation:
        raise CliError(
            f"{job.metadata.get('name')} has no checkpoint location yet: it sets no spec.checkpoints.uri "
            "and has not started (the operator records the platform default at the first start)",
            "wait for it to start, then try again",
        ) from None
