"""A job's events as typed records: what the job rules and the worker write, what ``swquant watch``
and the dashboard read by attribute.

An event is stored as its kind and a JSON object (``job_events.data``); the REST API hands that
object out as it is. Each model here is the one shape of its kind's object; a block's is the
engine's own record (quant_core.engine.BlockRecord) with the attempt that ran it.
"""

from __future__ import annotations

import enum
import json
from typing import Any, ClassVar

from pydantic import BaseModel

from quant_core.block_record import BlockRecord
from swq_shared.models import ErrorCode, JobStatus


class EventKind(enum.StrEnum):
    status = "status"
    block = "block"
    message = "message"
    tuning = "tuning"


class EventData(BaseModel):
    kind: ClassVar[EventKind]

    def stored(self) -> dict[str, Any]:
        """The JSON object to store: what the writer set, so an absent detail stays absent."""
        return self.model_dump(mode="json", exclude_unset=True)

    def summary(self) -> str:
        return json.dumps(self.stored())


class StatusEvent(EventData):
    """The job changed status; why, where it failed, or which worker claimed it."""

    kind: ClassVar[EventKind] = EventKind.status
    status: JobStatus
    worker: str | None = None  # the claiming worker, on running
    attempt: int | None = None  # the attempt number, on running
    reason: str | None = None  # why it went back to the queue
    attempts: int | None = None  # attempts used so far, on requeue
    error_code: ErrorCode | None = None
    error_message: str | None = None

    def summary(self) -> str:
        worker = f" on {self.worker}" if self.worker else ""
        detail = f": {self.error_code}: {self.error_message or ''}" if self.error_code else ""
        return f"{self.status}{worker}{detail}"


class BlockEvent(BlockRecord, EventData):
    """A block finished: the engine's record of it, and the attempt that ran it."""

    kind: ClassVar[EventKind] = EventKind.block
    attempt: int | None = None

    def summary(self) -> str:
        return (
            f"block {self.index + 1}/{self.num_blocks}: loss {self.loss_before:.4g} → {self.loss_after:.4g}, "
            f"{self.seconds:.2f} s"
        )


class TuningEvent(EventData):
    """A step of the end-to-end tuning and the loss it trained on (the dashboard's tuning curve)."""

    kind: ClassVar[EventKind] = EventKind.tuning
    step: int  # steps done, from 1
    steps: int
    loss: float

    def summary(self) -> str:
        return f"end-to-end tuning step {self.step}/{self.steps}: loss {self.loss:.4g}"


class MessageEvent(EventData):
    """A stage of the run or something that happened to the job, in words; ``resumed_blocks`` and
    ``resent`` say the two things other code acts on."""

    kind: ClassVar[EventKind] = EventKind.message
    message: str
    resumed_blocks: int | None = None  # this attempt resumed after that many blocks of an earlier one
    resent: bool | None = None  # the reaper sent the job to the broker again

    def summary(self) -> str:
        return self.message


EVENT_TYPES: dict[str, type[EventData]] = {
    t.kind.value: t for t in (StatusEvent, BlockEvent, MessageEvent, TuningEvent)
}


def read_event(kind: str, data: dict[str, Any]) -> EventData:
    """The typed record of a stored event."""
    return EVENT_TYPES[kind].model_validate(data)
