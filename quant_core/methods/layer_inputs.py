"""Which linears of a block read the same input, and what a module inside a block receives or returns.

GPTQ accumulates one Hessian per shared input and quantizes the block stage by stage in the order the
block runs (true-sequential); AWQ computes one scale vector per shared input. Both learn the sharing
by watching one forward pass instead of a per-architecture table: q/k/v receive the very same tensor
object, and so do gate/up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from quant_core.errors import ConfigError
from quant_core.methods.base import BlockData
from quant_core.model_structure import quantizable_linears


class _Captured(Exception):
    """Stops a block forward as soon as the watched module has been called."""


@contextmanager
def _linear_input_hooks(block: nn.Module, on_input: Callable[[str, Tensor], None]) -> Iterator[None]:
    """While open, every call of one of the block's linears passes ``(name, input tensor)`` to ``on_input``."""
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, name=name: on_input(name, first_argument(args, kwargs)), with_kwargs=True
        )
        for name, layer in quantizable_linears(block).items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recorded_linear_inputs(block: nn.Module) -> Iterator[list[tuple[str, Tensor]]]:
    """While open, every call of one of the block's linears appends ``(name, input tensor)`` to the list."""
    calls: list[tuple[str, Tensor]] = []
    with _linear_input_hooks(block, lambda name, tensor: calls.append((name, tensor))):
        yield calls


@contextmanager
def gathered_linear_inputs(block: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """While open, each call of one of the block's linears appends a CPU copy of its input to ``[name]``.

    Linears that read the very same tensor one after the other (q/k/v, gate/up) share one copy, so
    keeping a pass's linear inputs costs one tensor per stage, on the host, whatever the device.
    """
    gathered: dict[str, list[Tensor]] = {}
    last: list[tuple[Tensor, Tensor]] = []  # the last input seen and its copy

    def keep(name: str, tensor: Tensor) -> None:
        if not last or last[0][0] is not tensor:
            last[:] = [(tensor, tensor.detach().to("cpu", copy=True))]
        gathered.setdefault(name, []).append(last[0][1])

    try:
        with _linear_input_hooks(block, keep):
            yield gathered
    finally:
        last.clear()


@contextmanager
def recorded_outputs(block: nn.Module, sites: tuple[str, ...]) -> Iterator[dict[str, list[Tensor]]]:
    """While open, every call of the submodule named ``site`` appends its output to ``[site]``.

    A module that returns a tuple (attention returns its output and its weights) contributes the
    first element, what it adds to the residual stream.
    """
    outputs: dict[str, list[Tensor]] = {site: [] for site in sites}
    handles = []
    try:
        for site in sites:
            try:
                module = block.get_submodule(site)
            except AttributeError as error:
                raise ConfigError(f"sw_sites: the decoder block has no submodule named {site!r}", "sw_sites") from error
            handles.append(
                module.register_forward_hook(
                    lambda _m, _args, out, site=site: outputs[site].append(out[0] if isinstance(out, tuple) else out)
                )
            )
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def input_groups(block: nn.Module, data: BlockData) -> list[tuple[str, ...]]:
    """Names of the block's linears grouped by shared input, groups in the order the block runs them."""
    with recorded_linear_inputs(block) as calls, torch.no_grad():
        data.forward(data.inputs[:1], None)
    groups: list[list[str]] = []
    group_inputs: list[Tensor] = []
    seen: set[str] = set()
    for name, tensor in calls:
        if name in seen:
            continue
        seen.add(name)
        for group, shared in zip(groups, group_inputs, strict=True):
            if shared is tensor:
                group.append(name)
                break
        else:
            groups.append([name])
            group_inputs.append(tensor)
    return [tuple(g) for g in groups]


@torch.no_grad()
def capture_call(
    block: nn.Module, data: BlockData, hidden: Tensor, module: nn.Module
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments ``module`` receives when the block runs on ``hidden``.

    The block's forward stops right there, so capturing the input of an early layer costs only the
    part of the block before it.
    """
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        captured.append((args, dict(kwargs)))
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        data.forward(hidden, None)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {data.index}: the module was not called during the forward pass")
    return captured[0]


def layer_input(block: nn.Module, data: BlockData, hidden: Tensor, name: str) -> Tensor:
    """What the linear ``name`` receives when the block runs on ``hidden``."""
    return first_argument(*capture_call(block, data, hidden, block.get_submodule(name)))


def first_argument(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """A module's main input, whether it was passed by position or by keyword."""
    return args[0] if args else next(iter(kwargs.values()))


@torch.no_grad()
def input_grams(block: nn.Module, data: BlockData, hidden: Tensor, batch_size: int) -> dict[str, Tensor]:
    """``X^T X`` (float32) of every linear's input when the block runs on ``hidden``, in one pass.

    Linears that read the very same tensor (q/k/v, gate/up) get one product per batch, computed once.
    The block runs with its current weights, so this is what a method that quantizes every linear at
    once (not stage by stage) needs. On several ranks each runs its share of the windows and the
    products are summed over ranks; a rank whose share is empty (a sample it holds none of) runs one
    window of its own so that it knows the products' shapes, and adds zeros.
    """
    grams: dict[str, Tensor] = {}
    held = hidden.shape[0] > 0
    with recorded_linear_inputs(block) as calls:
        for batch in (hidden if held else data.inputs[:1]).split(batch_size):
            calls.clear()
            data.forward(batch, None)
            products: dict[int, Tensor] = {}
            for name, x in calls:
                if id(x) not in products:
                    flat = x.detach().reshape(-1, x.shape[-1]).float()
                    products[id(x)] = flat.T @ flat
                grams[name] = grams[name] + products[id(x)] if name in grams else products[id(x)]
    return {name: data.ranks.sum(gram if held else torch.zeros_like(gram)) for name, gram in grams.items()}
