"""Artifact storage: one interface over a local folder (the default) and S3-compatible object stores.

The API and the workers exchange uploaded models, checkpoints and reports through keys such as
``jobs/<job_id>/model/model.safetensors``. Keys come partly from users (uploaded file names), so
every key is validated before it reaches a path or a request: no ``..``, no absolute paths, no
control characters. Reads stream in chunks, since checkpoints are far larger than a worker's memory
budget for one request.
"""

from __future__ import annotations

import os
import secrets
import shutil
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.response import StreamingBody

MiB = 1 << 20
MAX_KEY_BYTES = 1024  # S3's limit on an object name, applied to both backends so keys stay portable
PARTIAL_SUFFIX = ".swq-partial"  # marks LocalStorage's in-progress writes; reserved in keys
DEFAULT_CHUNK_SIZE = MiB
S3_DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys per request
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
ACCESS_DENIED_CODES = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


class StorageError(RuntimeError):
    """The storage backend failed or is misconfigured; the message names the backend and the key."""


class InvalidKeyError(StorageError):
    """A key is not a safe relative POSIX path; the message says which rule it breaks."""


class NotFoundError(StorageError):
    """No object is stored under the key."""


class InvalidRangeError(StorageError):
    """A byte range that cannot be served (HTTP 416): negative, reversed or past the object's end."""


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative path, else raise InvalidKeyError.

    The same rules hold for both backends, so that a key accepted in development also works in
    production and can never escape the local root (path traversal) or smuggle control characters
    into logs and HTTP headers.
    """
    if not key:
        raise InvalidKeyError("storage key is empty")
    if key.startswith("/"):
        raise InvalidKeyError(f"storage key {key!r} must be relative, not start with '/'")
    if "\\" in key:
        raise InvalidKeyError(f"storage key {key!r} contains a backslash; use '/' between folders")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in key):
        raise InvalidKeyError(f"storage key {key!r} contains a control character")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"storage key is longer than {MAX_KEY_BYTES} bytes: {key[:64]!r}...")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"storage key {key!r} has an empty, '.' or '..' segment")
        if segment.endswith(PARTIAL_SUFFIX):
            raise InvalidKeyError(f"storage key {key!r}: names ending in {PARTIAL_SUFFIX!r} are reserved")
    return key


def check_range_arguments(key: str, start: int, end: int | None, chunk_size: int) -> None:
    """Reject what no object size makes valid, before any I/O: `end` is inclusive, as in HTTP Range."""
    if start < 0 or (end is not None and end < start):
        raise InvalidRangeError(f"invalid byte range {start}-{'' if end is None else end} for {key!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


class Storage(ABC):
    """Where job artifacts live. Keys are relative POSIX paths, checked by `validate_key`.

    A prefix names a folder: `list("jobs/1")` returns keys under ``jobs/1/``, never ``jobs/10/...``,
    so that deleting one job's artifacts cannot touch another's.
    """

    @abstractmethod
    def put_file(self, key: str, path: Path) -> int:
        """Store the file at `path` under `key`, replacing any previous object; return its size in bytes."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> int:
        """Store `data` under `key`, replacing any previous object; return its size in bytes."""

    def put_dir(self, prefix: str, directory: Path) -> list[tuple[str, int]]:
        """Store every file under `directory` as ``prefix/<relative path>``; return (key, size) pairs.

        Symlinks and special files are refused rather than followed: a user's upload could
        otherwise publish any file the service can read (``/etc/passwd``, another job's model).
        Every entry and every key is checked before the first upload, so a refused folder leaves
        nothing behind.
        """
        validate_key(prefix)
        if not directory.is_dir():
            raise StorageError(f"cannot upload {directory}: not a folder")
        files: list[Path] = []
        for path in sorted(directory.rglob("*")):
            if path.is_symlink():
                raise StorageError(f"refusing to upload {path}: symlinks are not stored; copy the target instead")
            if path.is_file():
                files.append(path)
            elif not path.is_dir():
                raise StorageError(f"refusing to upload {path}: not a regular file")
        keys = [validate_key(f"{prefix}/{path.relative_to(directory).as_posix()}") for path in files]
        return [(key, self.put_file(key, path)) for key, path in zip(keys, files, strict=True)]

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; NotFoundError if there is none."""

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    @abstractmethod
    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> Iterator[bytes]:
        """Bytes `start`..`end` (inclusive, like HTTP Range; `end=None` reads to the end) in chunks.

        An `end` past the object is clamped to its last byte (RFC 9110 §14.1.2). NotFoundError and
        InvalidRangeError are raised by the call itself, before the first chunk, so that an HTTP
        handler can still answer 404 or 416 instead of a broken 200.
        """

    @abstractmethod
    def download_file(self, key: str, dest: Path) -> None:
        """Copy the object to `dest`, creating its folder."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under the folder `prefix`, sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder `prefix`; return how many there were."""

    @abstractmethod
    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str | None:
        """A URL that lets a client download the object directly, or None if the backend has none."""

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the backend is reachable and usable (readiness probe)."""


class LocalStorage(Storage):
    """Objects as files under `root`: the default, needing nothing beyond a disk shared by API and workers."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create storage folder {self.root}: {error}") from error

    def _path(self, key: str) -> Path:
        """The file for `key`, checked again after resolving symlinks so that it stays under the root."""
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidKeyError(f"storage key {key!r} resolves outside {self.root}")
        return path

    def _write_atomically(self, key: str, fill: Callable[[BinaryIO], object]) -> int:
        """Write through a temporary file in the same folder, then rename it over the key.

        `os.replace` within one file system is atomic, so a reader sees the old object or the
        whole new one, never a prefix. The fsync before it keeps a crash from leaving an empty file
        under the final name.
        """
        path = self._path(key)
        partial = path.with_name(f".{secrets.token_hex(8)}{PARTIAL_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with partial.open("xb") as out:
                    fill(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            return path.stat().st_size
        except OSError as error:
            raise StorageError(f"cannot write {key!r} under {self.root}: {error}") from error

    def put_file(self, key: str, path: Path) -> int:
        with path.open("rb") as source:
            return self._write_atomically(key, lambda out: shutil.copyfileobj(source, out, DEFAULT_CHUNK_SIZE))

    def put_bytes(self, key: str, data: bytes) -> int:
        return self._write_atomically(key, lambda out: out.write(data))

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"no object {key!r} in {self.root}")
        return path.stat().st_size

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> Iterator[bytes]:
        check_range_arguments(key, start, end, chunk_size)
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"no object {key!r} in {self.root}")
        file = path.open("rb")
        size = os.fstat(file.fileno()).st_size
        if start >= size and not (start == 0 and end is None):
            file.close()
            raise InvalidRangeError(f"byte range starts at {start} but {key!r} has {size} bytes")
        last = size - 1 if end is None else min(end, size - 1)
        return self._read_chunks(file, key, start, last, chunk_size)

    @staticmethod
    def _read_chunks(file: BinaryIO, key: str, start: int, last: int, chunk_size: int) -> Iterator[bytes]:
        with file:
            file.seek(start)
            remaining = last - start + 1
            while remaining > 0:
                chunk = file.read(min(chunk_size, remaining))
                if not chunk:
                    raise StorageError(f"{key!r} was truncated while being read")
                remaining -= len(chunk)
                yield chunk

    def download_file(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFoundError(f"no object {key!r} in {self.root}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)

    def list(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in folder.rglob("*")
            if path.is_file() and not path.name.endswith(PARTIAL_SUFFIX)
        )

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        folder = self._path(prefix)
        if folder.is_dir():
            try:
                shutil.rmtree(folder)
            except OSError as error:
                raise StorageError(f"cannot delete {prefix!r} under {self.root}: {error}") from error
        return len(keys)

    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str | None:
        """None: local files have no URL of their own, so the API streams them itself."""
        validate_key(key)
        return None

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage folder {self.root} is missing or not writable by this process")


class S3Storage(Storage):
    """Objects in an S3 bucket (AWS, MinIO, SeaweedFS...), under an optional key prefix.

    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``
    first). Files of `multipart_threshold` bytes or more move in parts of that size, in parallel,
    which multi-gigabyte checkpoints need (a single PUT stops at 5 GiB).
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        prefix: str = "",
        multipart_threshold: int = 64 * MiB,
    ) -> None:
        self.bucket = bucket
        self.region = region
        prefix = prefix.strip("/")
        self._prefix = f"{validate_key(prefix)}/" if prefix else ""
        # Path-style addressing for custom endpoints: virtual hosts (bucket.host) need DNS that
        # self-hosted servers rarely have.
        config = Config(
            region_name=region,
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._endpoint_url = endpoint_url
        self._client: BaseClient = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold
        )

    @cached_property
    def _probe(self) -> BaseClient:
        """A client for readiness checks, built on first use (workers never probe).

        A probe must answer within its deadline, so this client neither retries nor waits long.
        """
        config = self._client.meta.config.merge(
            Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=2)
        )
        return boto3.session.Session().client("s3", endpoint_url=self._endpoint_url, config=config)

    @property
    def endpoint(self) -> str:
        return self._client.meta.endpoint_url

    def _name(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def _url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn botocore's exceptions into this module's, naming the object and the endpoint."""
        try:
            yield
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in NOT_FOUND_CODES:
                raise NotFoundError(f"{what} does not exist") from error
            if code == "InvalidRange":
                raise InvalidRangeError(f"byte range is past the end of {what}") from error
            if code in ACCESS_DENIED_CODES:
                raise StorageError(
                    f"S3 at {self.endpoint} denied access to {what}: check AWS_ACCESS_KEY_ID, "
                    f"AWS_SECRET_ACCESS_KEY and the bucket policy ({error})"
                ) from error
            raise StorageError(f"S3 at {self.endpoint} refused a request on {what}: {error}") from error
        except (BotoCoreError, S3UploadFailedError) as error:
            raise StorageError(f"S3 request on {what} to {self.endpoint} failed: {error}") from error

    def put_file(self, key: str, path: Path) -> int:
        size = path.stat().st_size
        with self._errors(self._url(key)):
            self._client.upload_file(str(path), self.bucket, self._name(key), Config=self._transfer)
        return size

    def put_bytes(self, key: str, data: bytes) -> int:
        with self._errors(self._url(key)):
            self._client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data)
        return len(data)

    def size(self, key: str) -> int:
        with self._errors(self._url(key)):
            return self._client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"]

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> Iterator[bytes]:
        check_range_arguments(key, start, end, chunk_size)
        request = {"Bucket": self.bucket, "Key": self._name(key)}
        if start > 0 or end is not None:  # no Range for a whole object: "bytes=0-" fails on an empty one
            request["Range"] = f"bytes={start}-{'' if end is None else end}"
        with self._errors(self._url(key)):
            body = self._client.get_object(**request)["Body"]
        return self._stream(body, key, chunk_size)

    def _stream(self, body: StreamingBody, key: str, chunk_size: int) -> Iterator[bytes]:
        with closing(body), self._errors(self._url(key)):
            yield from body.iter_chunks(chunk_size)

    def download_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(self._url(key)):
            self._client.download_file(self.bucket, self._name(key), str(dest), Config=self._transfer)

    def list(self, prefix: str) -> list[str]:
        folder = self._name(prefix) + "/"
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
        with self._errors(f"s3://{self.bucket}/{folder}"):
            names = [entry["Key"] for page in pages for entry in page.get("Contents", [])]
        return sorted(name.removeprefix(self._prefix) for name in names)

    def delete_prefix(self, prefix: str) -> int:
        names = [self._name(key) for key in self.list(prefix)]
        for first in range(0, len(names), S3_DELETE_BATCH):
            batch = [{"Key": name} for name in names[first : first + S3_DELETE_BATCH]]
            with self._errors(f"s3://{self.bucket}/{self._name(prefix)}/"):
                response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                failed = response["Errors"][0]
                raise StorageError(
                    f"S3 at {self.endpoint} did not delete {len(response['Errors'])} objects under {prefix!r}, "
                    f"e.g. {failed.get('Key')}: {failed.get('Message')}"
                )
        return len(names)

    def presigned_url(self, key: str, expires_seconds: int = 3600) -> str | None:
        """A signed GET URL, so clients download checkpoints from S3 directly rather than through the API."""
        with self._errors(self._url(key)):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._name(key)}, ExpiresIn=expires_seconds
            )

    def check(self) -> None:
        with self._errors(f"bucket s3://{self.bucket}"):
            self._probe.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing.

        Only on request (setup scripts, tests): in production the bucket is provisioned with its
        own policies, and a typo in its name should fail `check` rather than create a new bucket.
        """
        request: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            request["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        # Already ours: created before, possibly by another process starting at the same time.
        already_ours = self._client.exceptions.BucketAlreadyOwnedByYou
        with self._errors(f"bucket s3://{self.bucket}"), suppress(already_ours):
            self._client.create_bucket(**request)


def open_storage(url: str, endpoint_url: str | None = None, region: str = "us-east-1") -> Storage:
    """The backend a settings URL names: ``file:///abs/path`` or ``s3://bucket[/prefix]``."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        if parts.netloc not in ("", "localhost") or not path.is_absolute():
            raise StorageError(f"storage URL {url!r} must name an absolute local folder: file:///abs/path")
        return LocalStorage(path)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"storage URL {url!r} has no bucket: use s3://bucket or s3://bucket/prefix")
        return S3Storage(parts.netloc, endpoint_url=endpoint_url, region=region, prefix=parts.path)
    raise StorageError(f"unsupported storage URL {url!r}: use file:///abs/path or s3://bucket[/prefix]")
