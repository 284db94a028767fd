"""HTTP Range parsing and upload-archive checks (untrusted input)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi import HTTPException

from api.routes.archives import ArchiveError, model_files, open_members
from api.routes.ranges import parse_range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-0", (0, 0)),
        ("bytes=10-19", (10, 19)),
        ("bytes=90-", (90, 99)),
        ("bytes=-5", (95, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=95-1000", (95, 99)),
        ("bytes=0-1,5-6", None),
        ("items=0-5", None),
        ("bytes=abc", None),
    ],
)
def test_range_header_parsing(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-200", "bytes=-0", "bytes=20-10"])
def test_unsatisfiable_ranges_are_416(header: str) -> None:
    with pytest.raises(HTTPException) as info:
        parse_range(header, 100)
    assert info.value.status_code == 416 and info.value.headers == {"Content-Range": "bytes */100"}


def _tar(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
    return path


MODEL = {"tiny/config.json": b"{}", "tiny/model.safetensors": b"x" * 10, "tiny/tokenizer.json": b"{}"}


def _names(path: Path) -> list[str]:
    with open_members(path) as members:
        return sorted(name for name, _ in model_files(members, 100, 10_000))


def test_a_model_directory_archive_is_accepted_with_its_top_folder_stripped(tmp_path: Path) -> None:
    assert _names(_tar(tmp_path / "m.tar.gz", MODEL)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_zip_archives_are_accepted(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as archive:
        for name, data in MODEL.items():
            archive.writestr(name, data)
    assert _names(tmp_path / "m.zip") == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize(
    ("entries", "symlink", "message"),
    [
        ({**MODEL, "../escape.json": b"{}"}, None, "unsafe path"),
        ({**MODEL, "/abs.json": b"{}"}, None, "unsafe path"),
        (MODEL, "tiny/link.json", "only regular files"),
        ({**MODEL, "tiny/pytorch_model.bin": b"pickle"}, None, "file type not accepted"),
        ({**MODEL, "tiny/modeling_evil.py": b"import os"}, None, "file type not accepted"),
        ({"tiny/model.safetensors": b"x"}, None, "config.json missing"),
        ({"tiny/config.json": b"{}"}, None, "no .safetensors"),
    ],
)
def test_unsafe_or_incomplete_archives_are_refused(
    tmp_path: Path, entries: dict, symlink: str | None, message: str
) -> None:
    with pytest.raises(ArchiveError, match=message):
        _names(_tar(tmp_path / "bad.tar.gz", entries, symlink))


def test_file_count_and_size_limits(tmp_path: Path) -> None:
    path = _tar(tmp_path / "m.tar.gz", MODEL)
    with open_members(path) as members, pytest.raises(ArchiveError, match="limit is 2"):
        model_files(members, 2, 10_000)
    with open_members(path) as members, pytest.raises(ArchiveError, match="more than 5 bytes"):
        model_files(members, 100, 5)


def test_non_archives_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"plain text, not an archive")
    with pytest.raises(ArchiveError, match="neither a tar nor a zip"), open_members(tmp_path / "x"):
        pass
