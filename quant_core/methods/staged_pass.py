"""One forward pass of a block that pauses before each stage, so the caller can quantize it in between.

True-sequential GPTQ needs each stage's inputs (q/k/v, then o, then gate/up, then down in a Llama
block) computed with the earlier stages already quantized. Replaying the block up to each stage costs
a partial pass per stage (about 1.7 passes of a Llama block for its four stages) and then one more
for the block's output. Suspending every batch's forward right before the next stage instead costs
one pass in all: each batch runs up to the stage's first linear and waits there; once every batch
waits, the stage's inputs are complete, the caller quantizes the stage, and the batches go on with
the new weights to the next stage. At the end the block's output comes out with every stage
quantized, which is what the engine feeds the next block.

Python can only suspend a running call inside a thread, so each batch's forward runs in a thread of
its own. The hand-off is strict (the driver resumes one batch and waits until it pauses or ends), so
exactly one thread computes at any time, in the same order as a plain loop, and the results are
those of the replay bit for bit. The price is memory: every batch's activations at the pause point
live at once, about what caching each stage's inputs would take (for a Llama block at the last stage,
roughly ``3 x intermediate + 2 x hidden`` floats per calibration token).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.methods.base import BlockData
from quant_core.methods.layer_inputs import first_argument


class _Abandoned(BaseException):
    """Unwinds a paused batch's forward when the pass stops early (an error, or a fallback)."""


class _Batch:
    """One batch's forward in its own thread, run a stretch at a time by the driving thread."""

    def __init__(self, run: Callable[[], Tensor]) -> None:
        self._run = run
        self._resume = threading.Event()
        self._paused = threading.Event()
        self.abandoned = False
        self.finished = False
        self.stage_input: Tensor | None = None
        self.output: Tensor | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            self._wait_for_turn()
            with torch.no_grad():  # grad mode is per thread: a new thread starts with it on
                self.output = self._run()
        except _Abandoned:
            pass
        except BaseException as error:  # handed to the driver, which re-raises it in its own thread
            self.error = error
        finally:
            self.finished = True
            self._paused.set()

    def _wait_for_turn(self) -> None:
        self._resume.wait()
        self._resume.clear()
        if self.abandoned:
            raise _Abandoned

    def pause(self, stage_input: Tensor) -> None:
        """Called in the batch's own thread: hand the stage's input over and wait to be resumed."""
        self.stage_input = stage_input
        self._paused.set()
        self._wait_for_turn()

    def step(self) -> None:
        """Called by the driver: let the batch run until it pauses at the next stage or ends."""
        self._paused.clear()
        self._resume.set()
        self._paused.wait()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """Unwind the batch wherever it waits and wait for its thread to end."""
        if self.thread.is_alive():
            self.abandoned = True
            self._resume.set()
            self.thread.join()


class _Stages:
    """Which stage each linear belongs to, and how many stages the batches may run through."""

    def __init__(self, stages: Sequence[tuple[str, ...]]) -> None:
        self.of = {name: index for index, stage in enumerate(stages) for name in stage}
        self.released = 0
        self.batches: dict[int, _Batch] = {}  # by thread id

    def before_linear(self, name: str, _module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        batch = self.batches.get(threading.get_ident())
        if batch is None:  # the block run outside the pass: nothing to stop
            return
        stage = self.of[name]
        if stage > self.released:
            raise RuntimeError(f"linear {name!r} ran before the stage in front of it was quantized")
        if stage == self.released:
            batch.pause(first_argument(args, kwargs))


@torch.no_grad()
def staged_pass(
    block: nn.Module,
    data: BlockData,
    stages: Sequence[tuple[str, ...]],
    quantize_stage: Callable[[int, list[Tensor]], None],
    batch_size: int,
) -> Tensor:
    """Run ``block`` once over ``data.inputs``, calling ``quantize_stage(i, inputs)`` before stage ``i`` runs.

    ``stages`` are the block's linears grouped by shared input, in the order the block calls them
    (:func:`~quant_core.methods.layer_inputs.input_groups`); ``inputs`` are what stage ``i``'s
    linears receive, one tensor per batch, with stages ``0..i-1`` as ``quantize_stage`` left them.
    Returns the block's output on every input. If ``quantize_stage`` raises, every paused batch is
    unwound before the error propagates, so no thread outlives the call; stages already quantized
    stay quantized.
    """
    control = _Stages(stages)
    batches = [_Batch(partial(data.forward, hidden, None)) for hidden in data.inputs.split(batch_size)]
    handles = [
        block.get_submodule(name).register_forward_pre_hook(partial(control.before_linear, name), with_kwargs=True)
        for name in control.of
    ]
    try:
        for batch in batches:
            batch.thread.start()
            assert batch.thread.ident is not None
            control.batches[batch.thread.ident] = batch
        for index, stage in enumerate(stages):
            for batch in batches:
                batch.step()
                if batch.finished:
                    raise RuntimeError(f"block {data.index}: the forward pass never reached {stage[0]!r}")
            inputs = [batch.stage_input for batch in batches if batch.stage_input is not None]
            for batch in batches:
                batch.stage_input = None
            quantize_stage(index, inputs)
            del inputs
            control.released = index + 1
        for batch in batches:
            batch.step()
        return torch.cat([batch.output for batch in batches if batch.output is not None])
    finally:
        for batch in batches:
            batch.abandon()
        for handle in handles:
            handle.remove()
