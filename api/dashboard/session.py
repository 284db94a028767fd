"""The dashboard's browser session: the user's API key in a signed, HttpOnly, SameSite=Lax cookie.

The cookie holds ``base64(json{key, csrf, issued}) . base64(hmac_sha256)``. The key is not encrypted
(the cookie never reaches scripts and only travels to this server), but it cannot be forged or
altered: a tampered or expired cookie reads as no session. The signing secret is
``SWQUANT_SECRET_KEY``; without it a random per-process secret is used, so sessions end when the
server restarts and do not survive across several API processes. The CSRF token lives in the same
cookie and must come back in every form that changes something (cancel, submit, logout).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache

from fastapi import Request, Response

from swq_shared.settings import Settings

COOKIE_NAME = "swq_session"
MAX_AGE_S = 12 * 3600


@dataclass(frozen=True)
class BrowserSession:
    api_key: str
    csrf_token: str
    issued_at: int


@lru_cache
def _process_secret() -> bytes:
    return secrets.token_bytes(32)


def signing_secret(settings: Settings) -> bytes:
    """The operator's secret (``SWQUANT_SECRET_KEY``), else one random per process."""
    return settings.secret_key.encode() if settings.secret_key else _process_secret()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


def encode_session(session: BrowserSession, secret: bytes) -> str:
    payload = _b64(json.dumps({"k": session.api_key, "c": session.csrf_token, "t": session.issued_at}).encode())
    return f"{payload}.{_signature(secret, payload)}"


def decode_session(value: str | None, secret: bytes, now: float | None = None) -> BrowserSession | None:
    """The session in a cookie value, or None when it is missing, tampered with or expired."""
    if not value or "." not in value:
        return None
    payload, signature = value.rsplit(".", 1)
    if not hmac.compare_digest(signature, _signature(secret, payload)):
        return None
    try:
        data = json.loads(_unb64(payload))
        session = BrowserSession(str(data["k"]), str(data["c"]), int(data["t"]))
    except (ValueError, KeyError, TypeError):
        return None
    if (now if now is not None else time.time()) - session.issued_at > MAX_AGE_S:
        return None
    return session


def new_session(api_key: str) -> BrowserSession:
    return BrowserSession(api_key, secrets.token_urlsafe(24), int(time.time()))


def read_session(request: Request) -> BrowserSession | None:
    return decode_session(request.cookies.get(COOKIE_NAME), signing_secret(request.app.state.settings))


def write_session(request: Request, response: Response, session: BrowserSession) -> None:
    response.set_cookie(
        COOKIE_NAME,
        encode_session(session, signing_secret(request.app.state.settings)),
        max_age=MAX_AGE_S,
        path="/ui",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def clear_session(response: Response) -> None:
    response.delete_cookie(COOKIE_NAME, path="/ui", httponly=True, samesite="lax")


def csrf_matches(session: BrowserSession, submitted: object) -> bool:
    return isinstance(submitted, str) and hmac.compare_digest(submitted, session.csrf_token)
