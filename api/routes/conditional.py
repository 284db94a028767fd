"""JSON responses with an entity tag, so that a poller whose job has not changed gets a bodiless 304.

Clients poll a job every few seconds and, most of the time, nothing has changed. The tag is a hash of
the exact bytes sent, so it changes exactly when the answer does, needs no version column, and stays
right whatever the answer is built from. A 304 still costs the lookup, but not the transfer or the
client's parsing; ``Cache-Control: private, no-cache`` lets a client or proxy keep the body only for
revalidation, never share it across tenants.

The body is serialized once, from the response model, with pydantic's own encoder: the route
returns the ``Response`` itself, so FastAPI does not validate and encode the same model again.
"""

from __future__ import annotations

import hashlib

from fastapi import Request, Response
from pydantic import BaseModel

CACHE_CONTROL = "private, no-cache"


def entity_tag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def _matches(if_none_match: str | None, tag: str) -> bool:
    """RFC 9110 weak comparison against a list of tags (or ``*``)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(candidate.strip().removeprefix("W/") == tag for candidate in if_none_match.split(","))


def tagged_json(request: Request, model: BaseModel, status_code: int = 200) -> Response:
    """``model`` as JSON with its ETag, or 304 Not Modified when the request already holds that tag."""
    body = model.model_dump_json().encode()
    tag = entity_tag(body)
    headers = {"ETag": tag, "Cache-Control": CACHE_CONTROL}
    if request.method in ("GET", "HEAD") and _matches(request.headers.get("if-none-match"), tag):
        return Response(status_code=304, headers=headers)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)
