"""What a quantization method is: a small object that calibrates one block at a time.

The engine owns the data flow (capturing inputs, running blocks in order, feeding outputs forward);
a method only sees one block and its calibration data, and leaves fake-quantized weights in it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from quant_core.distributed import SOLO, Ranks
from quant_core.errors import ConfigError
from quant_core.incoherence import LinearRotation, RandomizedHadamard, check_widths
from quant_core.losses import Loss
from quant_core.method_options import MethodOptions, method_options_type
from quant_core.model_structure import quantizable_linears, stored_layout, weight_matrix
from quant_core.quantizer import QuantSpec, fake_quantize, grid_params

# Runs the block on a batch of inputs, optionally with some parameters replaced (by full name).
BlockForward = Callable[[Tensor, Mapping[str, Tensor] | None], Tensor]


@dataclass
class BlockData:
    """One block's calibration data, as the engine hands it to a method."""

    index: int
    num_blocks: int
    inputs: Tensor  # outputs of the already-quantized previous blocks, [n, seq, hidden]
    # Full-precision block applied to full-precision inputs, [n, seq, hidden]; None for a method that
    # does not train against them (``QuantMethod.needs_targets``), which spares a pass per block.
    targets: Tensor | None
    forward: BlockForward
    generator: torch.Generator  # seeded per block, for shuffling and any other draw
    # Full-precision outputs of the submodules the loss aligns (``Loss.sites``), each [n, seq, hidden].
    site_targets: Mapping[str, Tensor] = field(default_factory=dict)
    # What each linear received in the full-precision block on the full-precision inputs, one CPU
    # tensor per forward batch, in window order; only for a method with ``needs_float_inputs``.
    float_linear_inputs: Mapping[str, list[Tensor]] = field(default_factory=dict)
    # Each linear's scheme where a size budget gave the block's linears different widths (by name in
    # the block, quant_core.allocation); a linear not named here takes the method's own spec.
    schemes: Mapping[str, QuantSpec] = field(default_factory=dict)
    # The ranks the job's windows are split over: ``inputs`` are this rank's share of ``total_windows``
    # (None: they are all), and what a method sums over windows it sums over ranks too
    # (quant_core.distributed).
    ranks: Ranks = SOLO
    total_windows: int | None = None
    # The block's output on every input, left by a method that computed it on the way (GPTQ's staged
    # pass) with the weights state it was computed with; see ``keep_outputs``.
    _outputs: tuple[Tensor, tuple[tuple[int, int, int], ...]] | None = None

    @property
    def windows(self) -> int:
        """Calibration windows over all ranks."""
        return self.inputs.shape[0] if self.total_windows is None else self.total_windows

    def keep_outputs(self, block: nn.Module, outputs: Tensor) -> None:
        """Offer the engine the block's output on every input, sparing it that pass."""
        self._outputs = (outputs, weights_state(block))

    def current_outputs(self, block: nn.Module) -> Tensor | None:
        """The kept outputs if no parameter or buffer of ``block`` changed since, else None.

        A method that builds on another (NormTweaking trains norms after GPTQ) changes weights after
        the outputs were kept; checking the state here, instead of asking every such method to
        forget them, makes a stale output impossible to feed forward.
        """
        if self._outputs is None or self._outputs[1] != weights_state(block):
            return None
        return self._outputs[0]


def weights_state(block: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """Identity, storage and in-place version of every parameter and buffer: changes on any write."""
    tensors = [*block.parameters(), *block.buffers()]
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


class QuantMethod:
    """Base class: ``calibrate`` fits the method on one block and writes quantized weights into it.

    A method with ``whole_model = True`` (DiscQuant) is not blockwise: the pipeline calls its
    ``quantize_model`` once with the whole model and the calibration windows instead of the engine.
    """

    options_type: ClassVar[type[MethodOptions]] = MethodOptions
    # read from ``options_type`` (quant_core.method_options), where a request's checks find them without torch
    name: ClassVar[str]
    default_loss: ClassVar[str]
    whole_model: ClassVar[bool]
    rotation_option: ClassVar[str]  # the option that turns the rotation on, under ``method_options``
    needs_targets: ClassVar[bool] = False  # whether calibrate reads BlockData.targets

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options_type" not in vars(cls):  # an intermediate class: its subclasses declare theirs
            return
        declared = cls.options_type
        cls.name, cls.default_loss = declared.method, declared.default_loss
        cls.whole_model, cls.rotation_option = declared.whole_model, declared.rotation_option

    @property
    def needs_float_inputs(self) -> bool:
        """Whether calibrate reads ``BlockData.float_linear_inputs`` (the engine records them only then)."""
        return False

    def __init__(self, spec: QuantSpec, loss: Loss, options: MethodOptions) -> None:
        self.spec, self.loss, self.options = spec, loss, options

    @property
    def rotates(self) -> bool:
        """Whether the method quantizes in a rotated basis, so its weights lie on no grid the export can pack."""
        return self.options.rotates

    def block_schemes(self, block: nn.Module, data: BlockData) -> dict[str, QuantSpec]:
        """Every quantizable linear of ``block`` with the scheme it is calibrated at: the allocation's
        (``data.schemes``) where it gave one, the method's spec elsewhere."""
        return {name: data.schemes.get(name, self.spec) for name in quantizable_linears(block)}

    def check(self, blocks: nn.ModuleList) -> None:
        """Refuse a model this method cannot handle before any time is spent on it.

        The default accepts any model, except that incoherence processing needs a Hadamard matrix
        for every linear's input and output width.
        """
        if self.rotates:
            linears = [m for block in blocks for m in quantizable_linears(block).values()]
            check_widths(size for m in linears for size in weight_matrix(m).shape)

    def calibrate(self, block: nn.Module, data: BlockData) -> dict[str, Any]:
        """Quantize ``block`` in place; return method-specific statistics for the report."""
        raise NotImplementedError

    # --- the whole-model contract (``whole_model = True``), called by the pipeline instead of the engine

    def check_resources(self, model: nn.Module, seq_len: int, device: str, sharing: int = 1) -> dict[str, Any]:
        """Refuse, before any work, a run that cannot fit; return the estimate for the report."""
        raise NotImplementedError(f"{self.name} is blockwise: the engine calls calibrate per block")

    def quantize_model(
        self,
        model: nn.Module,
        windows: Tensor,
        *,
        device: str = "cpu",
        seed: int = 0,
        on_stage: Callable[[str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        ranks: Ranks = SOLO,
    ) -> dict[str, Any]:
        """Quantize every block of ``model`` at once on ``windows`` (on several ``ranks``, each with the
        whole model and all the windows, sharing out the work); return statistics for the report."""
        raise NotImplementedError(f"{self.name} is blockwise: the engine calls calibrate per block")


GRID_BUFFERS = ("quant_scale", "quant_zero")
# A grid in QuIP's rotated basis and the rotation's signs: what end-to-end tuning needs to move the
# step sizes of a rotated layer (quant_core.finetune). Named apart from GRID_BUFFERS so the packed
# export never takes such a layer for one whose weights lie on a grid.
ROTATED_GRID_BUFFERS = ("rotated_scale", "rotated_zero", "rotated_out_signs", "rotated_in_signs")
KEPT_BUFFERS = GRID_BUFFERS + ROTATED_GRID_BUFFERS  # what a block checkpoint keeps beside the state dict


def write_quantized(block: nn.Module, quantized: Mapping[str, tuple[Tensor, Tensor, Tensor]]) -> None:
    """Write each linear's fake-quantized ``[out, in]`` weight and keep its grid on the layer.

    The grid (scale and zero point, ``[out, groups]``) cannot be read back from the weights when a
    method clipped or tuned it, and the packed export needs it, so it travels with the layer as
    non-persistent buffers (moved with the module, never saved into the fake-quant checkpoint).
    """
    layers = quantizable_linears(block)
    for name, (matrix, scale, zero) in quantized.items():
        layer = layers[name]
        with torch.no_grad():
            layer.weight.copy_(stored_layout(layer, matrix))
        for buffer, value in zip(GRID_BUFFERS, (scale, zero), strict=True):
            layer.register_buffer(buffer, value.detach().float().to(layer.weight.device), persistent=False)


def write_dequantized(block: nn.Module, matrices: Mapping[str, Tensor]) -> None:
    """Write ``[out, in]`` weights that lie on no single grid (a rotation was undone), dropping any grid.

    Without a grid on the layer the packed export cannot mistake these weights for packable ones.
    """
    layers = quantizable_linears(block)
    for name, matrix in matrices.items():
        layer = layers[name]
        with torch.no_grad():
            layer.weight.copy_(stored_layout(layer, matrix))
        for buffer in KEPT_BUFFERS:
            layer._buffers.pop(buffer, None)


RotatedGrid = tuple[Tensor, Tensor, LinearRotation]  # scale and zero (``[out, groups]``) in the rotated basis


def write_rotated(block: nn.Module, quantized: Mapping[str, tuple[Tensor, RotatedGrid]]) -> None:
    """Write each linear's ``U^T Q V`` (``[out, in]``) and keep the rotated grid and rotation on the layer.

    The weight lies on no grid the export can pack (:func:`write_dequantized`), but its codes in the
    rotated basis are recoverable from the kept grid, so a later stage can move the step sizes.
    """
    write_dequantized(block, {name: matrix for name, (matrix, _) in quantized.items()})
    layers = quantizable_linears(block)
    for name, (_, (scale, zero, rotation)) in quantized.items():
        layer = layers[name]
        values = (scale, zero, rotation.out_rotation.signs, rotation.in_rotation.signs)
        for buffer, value in zip(ROTATED_GRID_BUFFERS, values, strict=True):
            layer.register_buffer(buffer, value.detach().float().to(layer.weight.device), persistent=False)


def rotated_grid(layer: nn.Module) -> RotatedGrid | None:
    """The rotated grid :func:`write_rotated` kept on ``layer``, or None."""
    values = [value for name in ROTATED_GRID_BUFFERS if isinstance(value := getattr(layer, name, None), Tensor)]
    if len(values) < len(ROTATED_GRID_BUFFERS):
        return None
    scale, zero, out_signs, in_signs = values
    rotation = LinearRotation(RandomizedHadamard.with_signs(out_signs), RandomizedHadamard.with_signs(in_signs))
    return scale, zero, rotation


def layer_grid(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The ``(scale, zero)`` a method stored on ``layer``, or None for a layer left in full precision."""
    scale, zero = (getattr(layer, name, None) for name in GRID_BUFFERS)
    return None if scale is None or zero is None else (scale, zero)


def _rtn_matrix(weight: Tensor, spec: QuantSpec, clip: Tensor | None = None) -> Tensor:
    """Round-to-nearest in float32 whatever the weight's dtype, rounded once back to it."""
    return fake_quantize(weight.float(), spec, clip, clip).to(weight.dtype)


def stage_scheme(schemes: Mapping[str, QuantSpec], stage: tuple[str, ...]) -> QuantSpec:
    """The one scheme of linears that read the same input (a GPTQ stage, an AWQ scale group): they are
    walked as one matrix and a runtime fuses them, so an allocation gives them one scheme."""
    specs = {schemes[name] for name in stage}
    if len(specs) > 1:
        raise ConfigError(f"linears that read one input must share a scheme: {', '.join(stage)}", "budget")
    return specs.pop()


def rtn_quantized(
    block: nn.Module, schemes: Mapping[str, QuantSpec], clip: Mapping[str, Tensor] | None = None
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Round-to-nearest weight and grid of every linear in ``schemes`` (by name in the block) at its
    scheme, ranges shrunk by ``clip`` where given.

    ``clip`` maps a linear's name to its ratios per row and group (``[out, groups, 1]``).
    """
    result = {}
    for name, layer in quantizable_linears(block).items():
        if name not in schemes:
            continue
        spec, weight = schemes[name], weight_matrix(layer).detach()
        factor = None if clip is None else clip.get(name)
        result[name] = (_rtn_matrix(weight, spec, factor), *grid_params(weight, spec, factor, factor))
    return result


def rotated_rtn_weights(
    block: nn.Module, schemes: Mapping[str, QuantSpec], generator: torch.Generator
) -> dict[str, Tensor]:
    """Round-to-nearest in QuIP's rotated basis, ``U^T rtn(U W V^T) V``, per linear (``[out, in]``) at
    its scheme.

    Signs are drawn from ``generator`` linear by linear in the block's order, ``U`` before ``V``.
    """
    result = {}
    for name, layer in quantizable_linears(block).items():
        weight = weight_matrix(layer).detach()
        rotation = LinearRotation.draw(weight.shape[0], weight.shape[1], generator)
        rotated = rotation.rotate(weight.float())
        result[name] = rotation.restore(fake_quantize(rotated, schemes[name])).to(weight.dtype)
    return result


def rtn_weights(block: nn.Module, schemes: Mapping[str, QuantSpec]) -> dict[str, Tensor]:
    """Round-to-nearest weights of the linears in ``schemes`` (by name in the block), each at its
    scheme, by parameter name and in storage layout: parameter overrides for ``functional_call``."""
    return {
        f"{name}.weight": stored_layout(layer, _rtn_matrix(weight_matrix(layer).detach(), schemes[name]))
        for name, layer in quantizable_linears(block).items()
        if name in schemes
    }


def write_weights(block: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Copy new values into the block's parameters, keeping each parameter's dtype."""
    params = dict(block.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


METHODS: dict[str, type[QuantMethod]] = {}


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[QuantMethod]:
    """The method registered as ``name``, or an error that lists the methods."""
    return METHODS[method_options_type(name).method]


def build_method(
    name: str, spec: QuantSpec, loss: Loss, options: MethodOptions | Mapping[str, Any] | None = None
) -> QuantMethod:
    """The method registered as ``name`` with its options (validated here when given as a mapping)."""
    cls = method_class(name)
    if not isinstance(options, MethodOptions):
        options = cls.options_type.from_dict(options or {})
    elif not isinstance(options, cls.options_type):
        raise ConfigError(f"{type(options).__name__} are not {name}'s options", "method_options")
    return cls(spec, loss, options)
