"""The job request on the wire: quant_core's JobSettings plus what only the service has (queue, labels).

Validating a JobRequest is the whole check (quant_core.job_settings): types and ranges, the named
method's and loss's options, and every check across settings (sw_block_size against seq_len, lazy
loading with a rotation...), each naming the offending field, so a bad spec is refused at submission,
not found later by a worker; and none of it loads torch.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from quant_core.errors import ConfigError
from quant_core.job_settings import JobSettings
from quant_core.lightcompress_config import parse_lightcompress

UPLOAD_PREFIX = "upload:"


class JobRequest(JobSettings):
    """What a user submits: a job's settings, the worker pool to run on and labels to find it by."""

    queue: Literal["gpu", "cpu"] | None = Field(None, description="worker pool to run on; unset: the server's default")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)

    def upload_ids(self) -> dict[str, str]:
        """Uploads this job reads (its model and texts) by request field, so ownership can be checked."""
        refs = {"model": self.model, "calibration.text": self.calibration.text}
        refs.update({f"evaluation.texts.{i}": text for i, text in enumerate(self.evaluation.texts)})
        return {field: r.removeprefix(UPLOAD_PREFIX) for field, r in refs.items() if r.startswith(UPLOAD_PREFIX)}

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: Any) -> Any:
        """NUL can be neither stored nor used in a path: refuse it anywhere in the request, by field."""
        for path, value in _strings(data):
            if "\x00" in value:
                raise ValueError(f"{path or 'body'}: NUL characters are not allowed")
        return data


def _strings(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string in a parsed JSON value (keys included) with its dotted path."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            found += [(child, str(key)), *_strings(item, child)]
        return found
    if isinstance(value, list):
        return [pair for i, item in enumerate(value) for pair in _strings(item, f"{path}.{i}")]
    return []


def request_from_lightcompress(text: str) -> JobRequest:
    """A JobRequest from a LightCompress-style YAML document (the same mapping as ``swquant --config``)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", "config") from exc
    body, _ = parse_lightcompress(document)
    return JobRequest.model_validate(body)
