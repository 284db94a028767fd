"""Checking uploaded model archives before anything is stored.

An archive is untrusted input: every member must be a regular file with a plain relative name (no
absolute paths, ``..``, links or devices), the counts and sizes are capped, and only file types a
safetensors model directory needs are accepted, so no pickle ever reaches a worker.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

ALLOWED_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken", ".md"}


class ArchiveError(ValueError):
    """The archive is refused; the message says which member and why."""


@dataclass(frozen=True)
class Member:
    name: str  # normalised relative path inside the model directory
    size: int
    open: Callable[[], IO[bytes] | None]


def _clean_name(raw: str) -> str:
    path = PurePosixPath(raw.replace("\\", "/"))
    if path.is_absolute() or any(part in ("..", "") for part in path.parts) or raw.startswith("/"):
        raise ArchiveError(f"unsafe path in archive: {raw!r}")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        raise ArchiveError(f"unsafe path in archive: {raw!r}")
    return "/".join(parts)


@contextmanager
def open_members(path: Path) -> Iterator[list[Member]]:
    """The regular-file members of a tar (any compression) or zip archive, after safety checks."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = []
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
                    raise ArchiveError(f"{info.filename}: only regular files are accepted (no links)")
                members.append(Member(_clean_name(info.filename), info.file_size, lambda info=info: archive.open(info)))
            yield members
        return
    if not tarfile.is_tarfile(path):
        raise ArchiveError("upload is neither a tar nor a zip archive")
    with tarfile.open(path, "r:*") as archive:
        members = []
        for info in archive.getmembers():
            if info.isdir():
                continue
            if not info.isfile():
                raise ArchiveError(f"{info.name}: only regular files are accepted (no links or devices)")
            members.append(Member(_clean_name(info.name), info.size, lambda info=info: archive.extractfile(info)))
        yield members


def model_files(members: list[Member], max_files: int, max_bytes: int) -> list[tuple[str, Member]]:
    """Relative file names of the model directory (a single top folder is stripped), checked."""
    if not members:
        raise ArchiveError("archive is empty")
    if len(members) > max_files:
        raise ArchiveError(f"archive holds {len(members)} files; the limit is {max_files}")
    if sum(m.size for m in members) > max_bytes:
        raise ArchiveError(f"archive unpacks to more than {max_bytes} bytes")
    tops = {m.name.split("/", 1)[0] for m in members}
    strip = len(tops) == 1 and all("/" in m.name for m in members)
    files = [(m.name.split("/", 1)[1] if strip else m.name, m) for m in members]
    for name, _ in files:
        if PurePosixPath(name).suffix.lower() not in ALLOWED_SUFFIXES:
            raise ArchiveError(f"{name}: file type not accepted (safetensors weights, JSON and tokenizer files only)")
    names = {name for name, _ in files}
    if "config.json" not in names:
        raise ArchiveError("config.json missing at the top of the model directory")
    if not any(n.endswith(".safetensors") for n in names):
        raise ArchiveError("no .safetensors weights in the archive")
    return files


def read_member(member: Member) -> IO[bytes]:
    handle = member.open()
    if handle is None:
        raise ArchiveError(f"{member.name}: cannot be read")
    return handle
