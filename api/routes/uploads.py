"""``/v1/models`` and ``/v1/datasets``: upload a safetensors model directory or a text corpus."""

from __future__ import annotations

import codecs
import tempfile
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from sqlalchemy import select

from api.routes.archives import ArchiveError, model_files, open_members, read_member
from api.routes.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from api.routes.errors import invalid_field
from api.routes.schemas import UploadOut, error_responses
from swq_shared.artifacts import upload_prefix
from swq_shared.models import Upload, new_id
from swq_shared.storage import InvalidKeyError

router = APIRouter(prefix="/v1", tags=["uploads"], responses=error_responses(401, 429, 503))
_UPLOAD_ERRORS = error_responses(400, 413)
CHUNK = 1 << 20
NameField = Annotated[str, Form(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]


def _refuse_oversized(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload larger than the limit of {limit} bytes")


def _copy_limited(source: BinaryIO, target: Path, limit: int) -> int:
    """Copy in chunks, refusing (413) as soon as more than ``limit`` bytes arrived."""
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise HTTPException(413, f"upload larger than the limit of {limit} bytes")
            out.write(chunk)
    return written


def _file_error(message: str) -> HTTPException:
    """A 422 naming the uploaded file field."""
    return invalid_field(("body", "file"), message)


def _record(session: SessionDep, upload: Upload) -> UploadOut:
    """Register an upload once its files are all in storage, so a listed upload is always complete."""
    session.add(upload)
    session.flush()
    return UploadOut.of(upload)


@router.post("/models", status_code=201, response_model=UploadOut, responses=_UPLOAD_ERRORS)
def upload_model(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    file: Annotated[UploadFile, File(description="tar, tar.gz or zip of a safetensors model directory")],
    name: NameField,
) -> UploadOut:
    _refuse_oversized(request, settings.max_upload_bytes)
    upload_id = new_id()
    prefix = upload_prefix(tenant.id, upload_id)
    with tempfile.TemporaryDirectory(prefix="swquant-upload-") as tmp:
        archive = Path(tmp) / "archive"
        _copy_limited(file.file, archive, settings.max_upload_bytes)
        total = 0
        try:
            with open_members(archive) as members:
                files = model_files(members, settings.max_upload_files, settings.max_upload_bytes)
                for relative, member in files:
                    extracted = Path(tmp) / "file"
                    with read_member(member) as handle:
                        total += _copy_limited(handle, extracted, settings.max_upload_bytes)
                    storage.put_file(f"{prefix}/{relative}", extracted)
        except (ArchiveError, InvalidKeyError) as exc:
            storage.delete_prefix(prefix)
            raise _file_error(str(exc)) from exc
    return _record(
        session,
        Upload(
            id=upload_id,
            tenant_id=tenant.id,
            kind="model",
            name=name,
            storage_prefix=prefix,
            size=total,
            files=len(files),
        ),
    )


@router.post("/datasets", status_code=201, response_model=UploadOut, responses=_UPLOAD_ERRORS)
def upload_dataset(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    file: Annotated[UploadFile, File(description="UTF-8 plain text")],
    name: NameField,
) -> UploadOut:
    _refuse_oversized(request, settings.max_text_upload_bytes)
    upload_id = new_id()
    prefix = upload_prefix(tenant.id, upload_id)
    with tempfile.TemporaryDirectory(prefix="swquant-upload-") as tmp:
        text = Path(tmp) / "corpus.txt"
        size = _copy_limited(file.file, text, settings.max_text_upload_bytes)
        _require_utf8_text(text, size)
        storage.put_file(f"{prefix}/corpus.txt", text)
    return _record(
        session,
        Upload(id=upload_id, tenant_id=tenant.id, kind="dataset", name=name, storage_prefix=prefix, size=size, files=1),
    )


def _require_utf8_text(path: Path, size: int) -> None:
    if size == 0:
        raise _file_error("the text is empty")
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                if b"\x00" in chunk:
                    raise UnicodeDecodeError("utf-8", chunk, 0, 1, "NUL byte")
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise _file_error("the text must be UTF-8 plain text") from exc


def _list(session: SessionDep, tenant_id: str, kind: str) -> list[UploadOut]:
    rows = session.scalars(
        select(Upload).where(Upload.tenant_id == tenant_id, Upload.kind == kind).order_by(Upload.created_at.desc())
    )
    return [UploadOut.of(u) for u in rows]


@router.get("/models", response_model=list[UploadOut])
def list_models(session: SessionDep, tenant: TenantDep) -> list[UploadOut]:
    return _list(session, tenant.id, "model")


@router.get("/datasets", response_model=list[UploadOut])
def list_datasets(session: SessionDep, tenant: TenantDep) -> list[UploadOut]:
    return _list(session, tenant.id, "dataset")
