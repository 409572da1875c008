"""The trainer's one S3 module: whole-file and whole-folder transfers that survive a flaky server.

Callers pass ``s3://`` URIs; bucket/key handling stays here. Two layers of retries, because they
cover different failures:

- botocore retries each request (mode ``standard``: throttling, 5xx, dropped connections), and
- :class:`ObjectStore` retries a whole transfer with exponential backoff for a bounded time, because
  a server that is killed or restarting surfaces from the transfer manager as a bare
  ``EndpointConnectionError`` after botocore gave up, not as a retryable ``S3UploadFailedError``.

Files below the multipart threshold (most files of a checkpoint, by count) move with one
``put_object``/``get_object`` each, not through boto3's transfer manager: ``upload_file`` and
``download_file`` build a manager with three thread pools for every file and first ask the server
for the size, which cost about twice the client CPU per small file. Larger files use the manager's
parallel parts. Either way a download is written to a temporary file in the destination folder and
renamed when whole, so a download cut off half way never leaves a file under its final name.

Errors that retrying cannot fix (no such bucket, refused credentials, no such object) are raised at
once as :class:`StorageError` with ``retryable=False`` and a message that says what to check.
Credentials come from the standard AWS environment variables and are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from finetune_trainer.runconfig import S3Config
from finetune_trainer.uris import join, parse_uri, s3_uri

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
_DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys per request
_READ_CHUNK = 1 * MiB  # read size of a streamed GET: few Python calls per object, little memory

_NO_BUCKET_CODES = {"NoSuchBucket"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "Forbidden",
    "403",
    "401",
}
_PRECONDITION_CODES = {"PreconditionFailed", "412"}
_RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "ConditionalRequestConflict", "OperationAborted"}


class StorageError(Exception):
    """An S3 operation failed. ``retryable`` tells the caller (and the exit code) whether to try again."""

    def __init__(self, message: str, *, uri: str, retryable: bool) -> None:
        super().__init__(message)
        self.uri = uri
        self.retryable = retryable


class NotFound(StorageError):
    """The object (or its bucket) does not exist."""


class AlreadyExists(StorageError):
    """A conditional create (``if_none_match``) found the object already there."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying. ``deadline_s`` bounds the outer loop around one whole transfer."""

    deadline_s: float = 600.0
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    max_attempts: int = 10  # botocore's attempts per request, the first one included
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass(frozen=True)
class TransferSettings:
    """Transfer manager tuning. Parts of 64 MiB keep a 10 GB shard under 160 parts."""

    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 64 * MiB
    max_concurrency: int = 8  # threads per file
    max_parallel_files: int = 4  # files at a time in upload_dir / download_prefix


class ObjectStore:
    """S3 client for the trainer: URIs in, retried transfers, clear errors."""

    def __init__(
        self,
        config: S3Config | None = None,
        *,
        retry: RetryPolicy | None = None,
        transfer: TransferSettings | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Build the client. ``env`` defaults to ``os.environ`` (the credentials are read from it).

        With ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` unset, botocore's default chain is used,
        which covers web-identity (IRSA) and pod-identity variables as well.
        """
        config = config or S3Config()
        env = os.environ if env is None else env
        self.retry = retry or RetryPolicy()
        self.transfer = transfer or TransferSettings()
        # botocore would read these variables itself; reading them here lets path-style follow them.
        endpoint = config.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        addressing = config.addressing_style
        if addressing == "auto" and endpoint:
            addressing = "path"  # S3-compatible servers rarely resolve virtual-host bucket names
        pool = max(10, self.transfer.max_concurrency * self.transfer.max_parallel_files + 2)
        client_config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": self.retry.max_attempts},
            connect_timeout=self.retry.connect_timeout_s,
            read_timeout=self.retry.read_timeout_s,
            max_pool_connections=pool,
            s3={"addressing_style": addressing},
        )
        credentials: dict[str, Any] = {}
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            credentials = {
                "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
                "aws_session_token": env.get("AWS_SESSION_TOKEN") or None,
            }
        region = config.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=region, config=client_config, **credentials
        )
        self.endpoint: str = self._client.meta.endpoint_url
        self._transfer_config = TransferConfig(
            multipart_threshold=self.transfer.multipart_threshold,
            multipart_chunksize=self.transfer.multipart_chunksize,
            max_concurrency=self.transfer.max_concurrency,
            preferred_transfer_client="classic",
        )

    # ----------------------------------------------------------------- single objects

    def upload_file(self, path: str | os.PathLike[str], uri: str) -> str:
        """Upload one local file to ``uri`` (multipart above the threshold); returns ``uri``."""
        bucket, key = _bucket_key(uri)
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"cannot upload {path}: not a file")
        action: Callable[[], object]
        if source.stat().st_size < self.transfer.multipart_threshold:
            action = partial(self._put_file, source, bucket, key)
        else:
            action = partial(self._client.upload_file, str(source), bucket, key, Config=self._transfer_config)
        self._retrying("upload", uri, action)
        return uri

    def download_file(self, uri: str, path: str | os.PathLike[str], *, size: int | None = None) -> Path:
        """Download ``uri`` to ``path`` (parents created). The file appears whole or not at all.

        ``size`` is the object's size where the caller knows it (from a listing): an object below the
        multipart threshold is then fetched with one GET. Without it the transfer manager asks the
        server first.
        """
        bucket, key = _bucket_key(uri)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        action: Callable[[], object]
        if size is not None and size < self.transfer.multipart_threshold:
            action = partial(self._get_file, bucket, key, target)
        else:
            action = partial(
                self._client.download_file, bucket, key, str(target), Config=self._transfer_config
            )
        self._retrying("download", uri, action)
        return target

    def read_bytes(self, uri: str) -> bytes:
        """The whole content of one (small) object."""
        bucket, key = _bucket_key(uri)

        def read() -> bytes:
            body: bytes = self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
            return body

        return self._retrying("read", uri, read)

    def put_bytes(self, uri: str, data: bytes, *, if_none_match: bool = False) -> None:
        """Write ``data`` to ``uri``. With ``if_none_match`` the write is a conditional create and
        raises :class:`AlreadyExists` when the key exists (S3 answers 412).

        A conditional create whose success reply was lost is retried and then reports
        :class:`AlreadyExists` for the object it wrote itself; callers that care compare contents.
        """
        bucket, key = _bucket_key(uri)
        extra = {"IfNoneMatch": "*"} if if_none_match else {}
        self._retrying(
            "write", uri, lambda: self._client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        )

    def delete(self, uri: str) -> None:
        """Delete one object; a missing object is no error (S3 semantics)."""
        bucket, key = _bucket_key(uri)
        self._retrying("delete", uri, partial(self._client.delete_object, Bucket=bucket, Key=key))

    def exists(self, uri: str) -> bool:
        """Whether the object exists; for a URI ending in ``/``, whether any object lies under it."""
        bucket, key = _bucket_key(uri)
        if not key or key.endswith("/"):
            page = self._retrying(
                "list", uri, lambda: self._client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            )
            return bool(page.get("KeyCount", 0))
        try:
            self._retrying("stat", uri, lambda: self._client.head_object(Bucket=bucket, Key=key))
        except NotFound:
            return False
        return True

    # ----------------------------------------------------------------- prefixes ("folders")
    # A prefix is treated as a folder: "s3://b/ckpt/step-1" lists "ckpt/step-1/...", never "ckpt/step-10".

    def list_keys(self, uri_prefix: str, *, page_size: int = 1000) -> list[str]:
        """URIs of every object under the folder ``uri_prefix``, in key order (all pages)."""
        return [uri for uri, _ in self._objects(uri_prefix, page_size)]

    def list_prefixes(self, uri_prefix: str, *, page_size: int = 1000) -> list[str]:
        """URIs (ending in ``/``) of the immediate sub-folders of ``uri_prefix``."""
        bucket, prefix = _bucket_folder(uri_prefix)
        pages = self._pages(bucket, prefix, page_size, "CommonPrefixes", delimiter="/")
        return [s3_uri(bucket, p["Prefix"]) for p in pages]

    def upload_dir(self, local_dir: str | os.PathLike[str], uri_prefix: str) -> list[str]:
        """Upload every file under ``local_dir`` (recursively) below ``uri_prefix``; returns the URIs."""
        root = Path(local_dir)
        if not root.is_dir():
            raise NotADirectoryError(f"cannot upload {root}: not a directory")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        uris = [join(uri_prefix, p.relative_to(root).as_posix()) for p in files]
        self._parallel([partial(self.upload_file, path, uri) for path, uri in zip(files, uris, strict=True)])
        return uris

    def download_prefix(self, uri_prefix: str, local_dir: str | os.PathLike[str]) -> list[Path]:
        """Download every object under the folder ``uri_prefix`` into ``local_dir``, keeping the layout."""
        bucket, prefix = _bucket_folder(uri_prefix)
        root = Path(local_dir)
        folder = s3_uri(bucket, prefix)
        jobs: list[tuple[str, Path, int]] = []
        for uri, size in self._objects(uri_prefix):
            relative = PurePosixPath(uri[len(folder) :])
            if not relative.parts or uri.endswith("/"):
                continue  # zero-byte "folder" placeholder objects
            if ".." in relative.parts or relative.is_absolute():
                raise StorageError(
                    f"refusing to download {uri}: its key leaves {root}", uri=uri, retryable=False
                )
            jobs.append((uri, root.joinpath(*relative.parts), size))
        self._parallel([partial(self.download_file, uri, path, size=size) for uri, path, size in jobs])
        return [path for _, path, _ in jobs]

    def delete_prefix(self, uri_prefix: str) -> int:
        """Delete every object under the folder ``uri_prefix`` (batched); returns how many."""
        bucket, prefix = _bucket_folder(uri_prefix)
        keys = [obj["Key"] for obj in self._pages(bucket, prefix, _DELETE_BATCH, "Contents")]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = {"Objects": [{"Key": k} for k in keys[start : start + _DELETE_BATCH]], "Quiet": True}
            delete = partial(self._client.delete_objects, Bucket=bucket, Delete=batch)
            reply = self._retrying("delete", uri_prefix, delete)
            if reply.get("Errors"):
                first = reply["Errors"][0]
                raise StorageError(
                    f"delete under {uri_prefix} failed for {len(reply['Errors'])} objects, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip(),
                    uri=uri_prefix,
                    retryable=first.get("Code") not in _AUTH_CODES,
                )
        return len(keys)

    # ----------------------------------------------------------------- machinery

    def _pages(
        self, bucket: str, prefix: str, page_size: int, field: str, delimiter: str | None = None
    ) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        uri = s3_uri(bucket, prefix)
        token: str | None = None
        while True:
            args = {**kwargs, "ContinuationToken": token} if token else kwargs
            page = self._retrying("list", uri, partial(self._client.list_objects_v2, **args))
            yield from page.get(field, [])
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _objects(self, uri_prefix: str, page_size: int = 1000) -> Iterator[tuple[str, int]]:
        """URI and size of every object under the folder ``uri_prefix``, in key order."""
        bucket, prefix = _bucket_folder(uri_prefix)
        for obj in self._pages(bucket, prefix, page_size, "Contents"):
            yield s3_uri(bucket, obj["Key"]), int(obj.get("Size", 0))

    def _put_file(self, source: Path, bucket: str, key: str) -> None:
        """One PUT of a whole file (below the multipart threshold). botocore rewinds the open file
        for its own retries and adds the default checksum, as the transfer manager would."""
        with source.open("rb") as body:
            self._client.put_object(Bucket=bucket, Key=key, Body=body)

    def _get_file(self, bucket: str, key: str, target: Path) -> None:
        """One GET streamed into a temporary file next to ``target``, renamed once it is whole.

        botocore checks the length (and the checksum, when the object has one) as the body is read;
        a connection cut half way raises, and the partial file is removed. Only a process killed
        in the middle can leave a ``.<name>.<random>.part`` file behind, never a short ``target``.
        """
        partial_file = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        try:
            with partial_file.open("xb") as out:
                body = self._client.get_object(Bucket=bucket, Key=key)["Body"]
                with contextlib.closing(body):
                    for chunk in body.iter_chunks(_READ_CHUNK):
                        out.write(chunk)
            os.replace(partial_file, target)
        finally:
            partial_file.unlink(missing_ok=True)

    def _parallel(self, transfers: list[Callable[[], object]]) -> None:
        """Run every transfer, a few files at a time; re-raise the first failure."""
        if not transfers:
            return
        with ThreadPoolExecutor(self.transfer.max_parallel_files, thread_name_prefix="s3") as pool:
            futures: list[Future[object]] = [pool.submit(transfer) for transfer in transfers]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in futures:
                if future.done() and not future.cancelled() and future.exception() is not None:
                    future.result()  # raises the first failure in submission order

    def _retrying(self, op: str, uri: str, action: Callable[[], T]) -> T:
        """Run ``action`` and retry retryable failures with exponential backoff until the deadline."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return action()
            except Exception as exc:  # classified below; anything unknown is re-raised untouched
                error = self._classify(op, uri, exc)
                if error is None:
                    raise
                elapsed = time.monotonic() - started
                if not error.retryable or elapsed >= self.retry.deadline_s:
                    if error.retryable:
                        error = StorageError(
                            f"{error} (gave up after {attempt} attempts over {elapsed:.0f}s)",
                            uri=uri,
                            retryable=True,
                        )
                    raise error from exc
                delay = min(self.retry.max_delay_s, self.retry.base_delay_s * 2 ** (attempt - 1))
                delay = min(delay * random.uniform(0.5, 1.0), max(0.0, self.retry.deadline_s - elapsed))
                log.warning(
                    "S3 %s of %s failed (%s); retry %d in %.1fs", op, uri, _short(exc), attempt, delay
                )
                time.sleep(delay)

    def _classify(self, op: str, uri: str, exc: BaseException) -> StorageError | None:
        """Turn a boto error into a :class:`StorageError`; ``None`` for errors that are not S3's."""
        bucket = _bucket_key(uri)[0]
        cause = _root_cause(exc)
        where = f"S3 {op} of {uri} failed"
        if isinstance(cause, botocore.exceptions.ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _NO_BUCKET_CODES:
                return NotFound(
                    f"{where}: bucket {bucket!r} does not exist at {self.endpoint}. Check the bucket name "
                    "and that the bucket was created on this endpoint.",
                    uri=uri,
                    retryable=False,
                )
            if code in _NOT_FOUND_CODES or status == 404:
                return NotFound(
                    f"{where}: no such object (or bucket {bucket!r} does not exist). Check the URI.",
                    uri=uri,
                    retryable=False,
                )
            if code in _PRECONDITION_CODES or status == 412:
                return AlreadyExists(f"{where}: the object already exists", uri=uri, retryable=False)
            if code in _AUTH_CODES or status in (401, 403):
                return StorageError(
                    f"{where}: access refused ({code or status}). Check the S3 credentials secret "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, credentials.s3SecretRef), that it may "
                    f"access bucket {bucket!r}, and the endpoint {self.endpoint}.",
                    uri=uri,
                    retryable=False,
                )
            retryable = status >= 500 or code in _RETRYABLE_CODES
            return StorageError(
                f"{where}: {code or status} {err.get('Message', '')}".rstrip(), uri=uri, retryable=retryable
            )
        if isinstance(cause, botocore.exceptions.NoCredentialsError):
            return StorageError(
                f"{where}: no S3 credentials. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(credentials.s3SecretRef in the FineTuneJob).",
                uri=uri,
                retryable=False,
            )
        if isinstance(cause, _NETWORK_ERRORS):
            return StorageError(
                f"{where}: cannot reach the S3 endpoint {self.endpoint} ({_short(cause)}). Check the "
                "endpoint URL and that the server is up.",
                uri=uri,
                retryable=True,
            )
        return None


_NETWORK_ERRORS = (
    botocore.exceptions.ConnectionError,  # EndpointConnectionError, ConnectionClosedError, timeouts
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    ConnectionError,
    TimeoutError,
)


def _root_cause(exc: BaseException) -> BaseException:
    """The S3 error behind boto3's wrappers (``S3UploadFailedError``, ``RetriesExceededError``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (botocore.exceptions.ClientError, *_NETWORK_ERRORS)):
            return current
        last = getattr(current, "last_exception", None)
        current = last if isinstance(last, BaseException) else (current.__cause__ or current.__context__)
    return exc


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = parse_uri(uri)
    if parsed.scheme != "s3":
        raise ValueError(f"expected an s3://bucket/key URI, got {uri!r}")
    return parsed.bucket, parsed.key


def _bucket_folder(uri: str) -> tuple[str, str]:
    """Bucket and key prefix of a folder URI: a trailing ``/`` is added to a non-empty key."""
    bucket, key = _bucket_key(uri)
    if key and not key.endswith("/"):
        key += "/"
    return bucket, key
