"""Masking secrets in log records, in the API and in the worker alike.

What is masked, whoever logs it:

- the password of any ``scheme://user:password@host`` URL (database, broker, storage);
- API keys (``swq_`` and their random part) wherever they appear, e.g. in the query string of a
  client that sent its key in the URL by mistake, which uvicorn's access log prints;
- values of query or form parameters named like credentials (``api_key``, ``token``, ``password``,
  ``X-Amz-Signature``...) and ``Bearer`` tokens;
- the exact values of the deployment's own secrets (the dashboard's signing secret, the S3 secret
  access key, the passwords in its URLs), whatever their shape.

Why a log record factory rather than a filter on handlers: uvicorn's access log has a handler of its
own that does not propagate to the root logger, and Celery installs its handlers when the worker
starts, after this code ran; a filter on the handlers present at start-up would miss some. The
factory builds every record of the process, whatever logger and handler it goes through, and the
processes the worker forks for its jobs inherit it.

The message and each argument are masked apart, because some formatters read the arguments back
(uvicorn's access formatter unpacks them); a traceback is rendered and masked when the record is
made, since an exception's message may quote a URL.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from swq_shared.settings import Settings

MASK = "***"
AWS_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # boto3 reads the S3 credentials there
MIN_SECRET_LENGTH = 6  # shorter known values would mask common words all over the log

PATTERNS = [
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*):([^@/?#\s]+)@"), rf"\1:{MASK}@"),
    (re.compile(r"\bswq_[A-Za-z0-9_-]{20,}"), f"swq_{MASK}"),
    (
        re.compile(
            r"(?i)\b((?:api[_-]?key|access[_-]?token|token|password|passwd|secret|x-amz-signature"
            r"|x-amz-credential|x-amz-security-token)=)[^&\s\"'#]+"
        ),
        rf"\1{MASK}",
    ),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\1{MASK}"),
]

_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None  # longest first: a secret may contain another
_previous_factory: Any = None  # the factory ours wraps, taken when installed
_formatter = logging.Formatter()


def mask(text: str) -> str:
    """``text`` with every secret replaced by ``***``."""
    if _known_pattern is not None:
        text = _known_pattern.sub(MASK, text)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class _Masked:
    """An argument whose text held a secret: formats as its masked ``str`` and ``repr``."""

    def __init__(self, value: object) -> None:
        self.text, self.representation = mask(str(value)), mask(repr(value))

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.representation


def _mask_argument(value: Any) -> Any:
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return mask(value)
    text, representation = str(value), repr(value)
    if mask(text) == text and mask(representation) == representation:
        return value  # left as it is, so that numeric formats and formatters reading it still work
    return _Masked(value)


def mask_record(record: logging.LogRecord) -> None:
    """Mask the record's message, arguments, traceback and stack in place."""
    record.msg = mask(record.msg) if isinstance(record.msg, str) else _mask_argument(record.msg)
    if isinstance(record.args, Mapping):
        record.args = {key: _mask_argument(value) for key, value in record.args.items()}
    elif isinstance(record.args, tuple):
        record.args = tuple(_mask_argument(value) for value in record.args)
    if record.exc_info and not record.exc_text:
        record.exc_text = mask(_formatter.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = mask(record.stack_info)


def _masking_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _previous_factory(*args, **kwargs)
    mask_record(record)
    return record


def url_passwords(urls: Iterable[str | None]) -> set[str]:
    """The passwords in URLs, as written and percent-decoded."""
    found = set()
    for url in urls:
        try:
            password = urlsplit(url).password if url else None
        except ValueError:  # not a URL urllib can read; whatever uses it will say so
            continue
        if password:
            found |= {password, unquote(password)}
    return found


def known_secrets(settings: Settings) -> set[str]:
    """The deployment's own secret values: dashboard secret, S3 secret key, passwords in its URLs."""
    values = url_passwords([settings.database_url, settings.broker_url, settings.storage_url, settings.s3_endpoint_url])
    values |= {settings.secret_key or ""} | {os.environ.get(name, "") for name in AWS_SECRET_VARIABLES}
    return {value for value in values if len(value) >= MIN_SECRET_LENGTH}


def remember_secrets(values: Iterable[str]) -> None:
    """Mask these exact values too, from now on."""
    global _known_pattern
    _known.update(value for value in values if len(value) >= MIN_SECRET_LENGTH)
    if _known:
        _known_pattern = re.compile("|".join(re.escape(value) for value in sorted(_known, key=len, reverse=True)))


def install_log_redaction(settings: Settings) -> None:
    """Mask secrets in every log record this process makes from now on; calling it again adds secrets."""
    global _previous_factory
    remember_secrets(known_secrets(settings))
    if _previous_factory is None:
        _previous_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_masking_factory)
