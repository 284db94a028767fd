"""HTTP byte ranges (RFC 9110 §14) for resumable artifact downloads: one range per request."""

from __future__ import annotations

from fastapi import HTTPException


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive for ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n``; None for the whole body.

    A header we do not serve as a range (another unit, several ranges) falls back to the whole body, as
    the RFC allows; a range that lies entirely past the end is answered 416.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[len("bytes=") :].strip().partition("-")
    if (
        not sep
        or not (first.isdigit() or last.isdigit())
        or (first and not first.isdigit())
        or (last and not last.isdigit())
    ):
        return None
    if not first:  # suffix range: the last n bytes
        length = int(last)
        if length == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> HTTPException:
    return HTTPException(416, "requested range not satisfiable", {"Content-Range": f"bytes */{size}"})
