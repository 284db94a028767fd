"""Storage behaviour, specified once and checked on a local folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import random
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from swq_shared.storage import (
    PARTIAL_SUFFIX,
    InvalidKeyError,
    InvalidRangeError,
    LocalStorage,
    MiB,
    NotFoundError,
    S3Storage,
    Storage,
    StorageError,
    open_storage,
)
from tests.s3_server import S3Endpoint, free_ports

DATA = random.Random(0).randbytes(4096)
LAST = len(DATA) - 1
RANGES = {  # (start, inclusive end), as an HTTP Range header gives them
    "first byte": (0, 0),
    "middle": (100, 2000),
    "last byte": (LAST, LAST),
    "open end": (1000, None),
    "whole object": (0, None),
    "end past the object": (4000, LAST + 100),
}


@pytest.fixture
def s3_env(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """The test server's credentials in the environment, where S3Storage reads them as in production."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


def fresh_s3_storage(endpoint: S3Endpoint, **options) -> S3Storage:
    """An S3Storage on a new bucket, so that no test sees another's objects."""
    storage = S3Storage(f"test-{uuid.uuid4().hex[:16]}", endpoint_url=endpoint.url, **options)
    storage.ensure_bucket()
    return storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each backend in turn; the S3 server starts only when an S3 case runs."""
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return fresh_s3_storage(request.getfixturevalue("s3_env"))


def read(storage: Storage, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(storage.iter_range(key, start, end))


def test_put_bytes_round_trip(storage: Storage) -> None:
    assert storage.put_bytes("jobs/1/report.json", DATA) == len(DATA)
    assert read(storage, "jobs/1/report.json") == DATA


def test_put_file_and_download_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes(DATA)
    assert storage.put_file("jobs/1/model/model.safetensors", source) == len(DATA)
    dest = tmp_path / "downloads" / "nested" / "model.safetensors"
    storage.download_file("jobs/1/model/model.safetensors", dest)
    assert dest.read_bytes() == DATA


def test_put_replaces_the_previous_object(storage: Storage) -> None:
    storage.put_bytes("jobs/1/state", b"old contents")
    storage.put_bytes("jobs/1/state", b"new")
    assert read(storage, "jobs/1/state") == b"new"


def test_size_and_exists(storage: Storage) -> None:
    storage.put_bytes("jobs/1/a.bin", DATA)
    assert storage.size("jobs/1/a.bin") == len(DATA)
    assert storage.exists("jobs/1/a.bin")
    assert not storage.exists("jobs/1/b.bin")


def test_missing_key_raises_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        storage.size("jobs/1/missing")
    with pytest.raises(NotFoundError):
        storage.iter_range("jobs/1/missing")
    with pytest.raises(NotFoundError):
        storage.download_file("jobs/1/missing", tmp_path / "missing")


def test_list_returns_sorted_keys_of_that_folder_only(storage: Storage) -> None:
    for key in ("jobs/1/sub/b", "jobs/1/a", "jobs/10/c", "jobs/2/d"):
        storage.put_bytes(key, b"x")
    assert storage.list("jobs/1") == ["jobs/1/a", "jobs/1/sub/b"]
    assert storage.list("jobs/3") == []


def test_delete_prefix_removes_that_folder_only(storage: Storage) -> None:
    for key in ("jobs/1/sub/b", "jobs/1/a", "jobs/10/c"):
        storage.put_bytes(key, b"x")
    assert storage.delete_prefix("jobs/1") == 2
    assert storage.list("jobs/1") == []
    assert storage.list("jobs/10") == ["jobs/10/c"]
    assert storage.delete_prefix("jobs/1") == 0


def test_iter_range_matches_slicing(storage: Storage) -> None:
    storage.put_bytes("jobs/1/blob", DATA)
    for name, (start, end) in RANGES.items():
        stop = None if end is None else end + 1
        assert read(storage, "jobs/1/blob", start, end) == DATA[start:stop], name


def test_iter_range_streams_in_chunks(storage: Storage) -> None:
    data = random.Random(1).randbytes(300_000)
    storage.put_bytes("jobs/1/big", data)
    chunks = list(storage.iter_range("jobs/1/big", chunk_size=64 * 1024))
    assert len(chunks) == 5
    assert max(len(chunk) for chunk in chunks) <= 64 * 1024
    assert b"".join(chunks) == data


def test_iter_range_rejects_unsatisfiable_ranges(storage: Storage) -> None:
    storage.put_bytes("jobs/1/blob", DATA)
    for start, end in [(len(DATA), None), (len(DATA) + 5, len(DATA) + 9), (10, 9), (-1, None)]:
        with pytest.raises(InvalidRangeError):
            storage.iter_range("jobs/1/blob", start, end)


def test_empty_object_reads_as_no_bytes(storage: Storage) -> None:
    assert storage.put_bytes("jobs/1/empty", b"") == 0
    assert storage.size("jobs/1/empty") == 0
    assert read(storage, "jobs/1/empty") == b""
    with pytest.raises(InvalidRangeError):  # no byte range fits in zero bytes (RFC 9110 §14.1.1)
        storage.iter_range("jobs/1/empty", 0, 5)


def test_put_dir_uploads_nested_folders(storage: Storage, tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub" / "deeper").mkdir(parents=True)
    (model / "config.json").write_bytes(b"{}")
    (model / "sub" / "weights.bin").write_bytes(DATA)
    (model / "sub" / "deeper" / "notes.txt").write_bytes(b"hello")
    uploaded = storage.put_dir("jobs/1/model", model)
    assert uploaded == [
        ("jobs/1/model/config.json", 2),
        ("jobs/1/model/sub/deeper/notes.txt", 5),
        ("jobs/1/model/sub/weights.bin", len(DATA)),
    ]
    assert storage.list("jobs/1/model") == [key for key, _ in uploaded]
    assert read(storage, "jobs/1/model/sub/weights.bin") == DATA


def test_put_dir_refuses_symlinks_and_uploads_nothing(storage: Storage, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not yours")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(b"{}")
    (model / "tokenizer.json").symlink_to(secret)
    with pytest.raises(StorageError, match="symlink"):
        storage.put_dir("jobs/1/model", model)
    assert storage.list("jobs/1/model") == []


INVALID_KEYS = {
    "dotdot": "../x",
    "absolute": "/abs",
    "empty-segment": "a//b",
    "dot": "a/./b",
    "backslash": "a\\b",
    "empty": "",
    "trailing-dotdot": "a/..",
    "trailing-slash": "a/",
    "nul": "a/b\x00c",
    "newline": "a/b\nc",
    "too-long": "k" * 1025,
    "reserved-suffix": f"a/b{PARTIAL_SUFFIX}",
}


@pytest.fixture(scope="module")
def unreachable_s3() -> S3Storage:
    """An S3Storage with no server behind it: invalid keys must be refused before any request."""
    return S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{free_ports(1)[0]}")


def every_operation(storage: Storage, key: str, folder: Path) -> list[Callable[[], object]]:
    return [
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.put_file(key, Path(__file__)),
        lambda: storage.put_dir(key, folder),
        lambda: storage.size(key),
        lambda: storage.exists(key),
        lambda: storage.iter_range(key),
        lambda: storage.download_file(key, folder / "out"),
        lambda: storage.list(key),
        lambda: storage.delete_prefix(key),
        lambda: storage.presigned_url(key),
    ]


@pytest.mark.parametrize("key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
def test_every_operation_rejects_invalid_keys_before_any_io(
    key: str, tmp_path: Path, unreachable_s3: S3Storage
) -> None:
    for storage in (LocalStorage(tmp_path / "store"), unreachable_s3):
        for operation in every_operation(storage, key, tmp_path):
            with pytest.raises(InvalidKeyError):
                operation()
    assert list((tmp_path / "store").iterdir()) == []


def test_check_passes_on_a_usable_backend(storage: Storage) -> None:
    storage.check()


def test_local_storage_refuses_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "store" / "jobs").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidKeyError, match="outside"):
        storage.put_bytes("jobs/1/x", b"x")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_local_writes_leave_no_partial_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    storage.put_file("jobs/1/a.bin", source)
    storage.put_bytes("jobs/1/b.bin", DATA)
    storage.put_bytes("jobs/1/sub/c.bin", DATA)
    with pytest.raises(StorageError):
        storage.put_bytes("jobs/1/sub", DATA)  # a folder holds that name: the rename fails
    names = sorted(path.relative_to(storage.root).as_posix() for path in storage.root.rglob("*"))
    assert names == ["jobs", "jobs/1", "jobs/1/a.bin", "jobs/1/b.bin", "jobs/1/sub", "jobs/1/sub/c.bin"]


def test_local_check_fails_when_the_folder_is_gone(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    (tmp_path / "store").rmdir()
    with pytest.raises(StorageError, match="missing or not writable"):
        storage.check()


def test_local_storage_has_no_presigned_urls(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.put_bytes("jobs/1/a", b"x")
    assert storage.presigned_url("jobs/1/a") is None


def test_s3_large_file_uploads_in_parts(s3_env: S3Endpoint, tmp_path: Path) -> None:
    storage = fresh_s3_storage(s3_env, multipart_threshold=5 * MiB)
    data = random.Random(2).randbytes(12 * MiB)
    source = tmp_path / "checkpoint.safetensors"
    source.write_bytes(data)
    assert storage.put_file("jobs/1/checkpoint.safetensors", source) == len(data)
    etag = s3_env.client().head_object(Bucket=storage.bucket, Key="jobs/1/checkpoint.safetensors")["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart object's ETag counts its parts
    dest = tmp_path / "downloaded.safetensors"
    storage.download_file("jobs/1/checkpoint.safetensors", dest)
    assert dest.read_bytes() == data


def test_s3_presigned_url_serves_the_object_to_a_plain_http_client(s3_env: S3Endpoint) -> None:
    storage = fresh_s3_storage(s3_env)
    storage.put_bytes("jobs/1/model.gguf", DATA)
    url = storage.presigned_url("jobs/1/model.gguf", expires_seconds=60)
    assert url is not None and url.startswith(s3_env.url)
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == DATA


def test_s3_ensure_bucket_is_idempotent(s3_env: S3Endpoint) -> None:
    storage = fresh_s3_storage(s3_env)
    storage.put_bytes("jobs/1/x", b"x")
    storage.ensure_bucket()
    assert storage.list("jobs/1") == ["jobs/1/x"]


def test_s3_keys_live_under_the_storage_prefix(s3_env: S3Endpoint) -> None:
    bucket = fresh_s3_storage(s3_env).bucket
    storage = S3Storage(bucket, endpoint_url=s3_env.url, prefix="tenant/a/")
    storage.put_bytes("jobs/1/x", b"x")
    assert storage.list("jobs") == ["jobs/1/x"]
    raw = s3_env.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [entry["Key"] for entry in raw] == ["tenant/a/jobs/1/x"]


def test_s3_check_names_a_missing_bucket(s3_env: S3Endpoint) -> None:
    storage = S3Storage(f"missing-{uuid.uuid4().hex[:16]}", endpoint_url=s3_env.url)
    with pytest.raises(StorageError, match=storage.bucket):
        storage.check()


def test_s3_check_fails_fast_when_nothing_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused")
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    storage = S3Storage("bucket", endpoint_url=endpoint)
    began = time.monotonic()
    with pytest.raises(StorageError, match=endpoint):
        storage.check()
    assert time.monotonic() - began < 5


def test_open_storage_file_url_opens_that_folder(tmp_path: Path) -> None:
    folder = tmp_path / "with space"
    storage = open_storage(folder.as_uri())
    assert isinstance(storage, LocalStorage)
    assert storage.root == folder.resolve()


def test_open_storage_s3_url_names_bucket_and_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused")
    storage = open_storage("s3://artifacts/swquant/prod/", endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.region, storage.endpoint) == ("artifacts", "eu-west-1", "http://127.0.0.1:9")
    assert storage.presigned_url("jobs/1/x").startswith("http://127.0.0.1:9/artifacts/swquant/prod/jobs/1/x?")


@pytest.mark.parametrize("url", ["ftp://host/x", "file:relative/path", "file://otherhost/x", "s3:///prefix", "/abs"])
def test_open_storage_rejects_urls_it_cannot_serve(url: str) -> None:
    with pytest.raises(StorageError, match=url):
        open_storage(url)
