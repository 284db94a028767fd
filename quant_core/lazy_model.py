"""Models larger than memory: a meta-device skeleton whose blocks are loaded from safetensors one at a time.

Only the parts outside the decoder blocks (embeddings, final norm, head, rotary tables) are kept in
memory. A block's weights are read from the checkpoint's shards when the engine reaches it, and
released again once the quantized block has been written to the output's own shard, so peak memory
is one block plus activations, not the model. Evaluation streams blocks the same way
(:func:`blockwise_perplexity`), from the original shards before calibration and from the written
output after it. The written output is an ordinary sharded Hugging Face checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from quant_core.distributed import SOLO, Ranks
from quant_core.engine import capture_block_inputs, run_block_batched
from quant_core.errors import ConfigError
from quant_core.export import packed_layer, unpacked_weight, write_quantization_config
from quant_core.layer_schemes import LayerSchemes
from quant_core.methods.base import KEPT_BUFFERS, layer_grid
from quant_core.model_structure import find_decoder_blocks, quantizable_linears
from quant_core.perplexity import ranked_perplexity, scored_batches, scored_nll, shared_windows
from quant_core.quantizer import QuantSpec

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD_BYTES = 1 << 18


def _return_freed_blocks_to_the_system() -> None:
    """Serve every allocation of 256 KiB or more with its own mmap, so a released block leaves the process.

    glibc raises its mmap threshold each time a large chunk is freed; after a few blocks, block-sized
    tensors come from the heap instead and the heap only grows, by about one block per block streamed.
    Fixing the threshold keeps the peak at one block. Other C libraries are left alone.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


class ShardedWeights:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read by name on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.files = {k: self.directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.directory / SINGLE_NAME).is_file():
            with safe_open(str(self.directory / SINGLE_NAME), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), self.directory / SINGLE_NAME)
        else:
            raise ConfigError(f"model: {directory} holds no safetensors checkpoint", "model")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def load(self, names: list[str]) -> dict[str, Tensor]:
        """The named tensors, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in keys})
        return tensors


def _set_parameter(module: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _initialise_buffers(model: PreTrainedModel, module: nn.Module) -> None:
    """Recompute the non-persistent buffers (rotary tables) a meta-device build left empty."""
    for sub in module.modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            sub.to_empty(device="cpu", recurse=False)
            model._init_weights(sub)


class LazyModel:
    """A causal LM whose decoder blocks visit memory one at a time."""

    def __init__(self, source: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> None:
        _return_freed_blocks_to_the_system()
        self.source, self.dtype = Path(source), dtype
        self.weights = ShardedWeights(self.source)
        config = AutoConfig.from_pretrained(self.source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.blocks = find_decoder_blocks(self.model)
        self.prefix = next(name for name, m in self.model.named_modules() if m is self.blocks)
        inside = {id(p) for p in self.blocks.parameters()}
        outside = [n for n, p in self.model.named_parameters(remove_duplicate=False) if id(p) not in inside]
        for name, value in self.weights.load([n for n in outside if n in self.weights]).items():
            _set_parameter(self.model, name, value.to(dtype))
        self.model.tie_weights()
        missing = [n for n, p in self.model.named_parameters() if p.is_meta and id(p) not in inside]
        if missing:
            raise ConfigError(f"model: {source} lacks {', '.join(missing[:5])}", "model")
        _initialise_buffers(self.model, self.model)

    def block_names(self, index: int) -> dict[str, str]:
        """Checkpoint name of each parameter of block ``index``, by its name inside the block."""
        return {name: f"{self.prefix}.{index}.{name}" for name, _ in self.blocks[index].named_parameters()}

    def load_block(self, index: int, weights: ShardedWeights | None = None) -> nn.Module:
        """Materialize block ``index`` on the CPU from ``weights`` (default: the source checkpoint)."""
        block = self.blocks[index]
        names = self.block_names(index)
        source = weights or self.weights
        missing = [full for full in names.values() if full not in source]
        if missing:
            raise ConfigError(f"model: {source.directory} lacks {', '.join(missing[:3])}", "model")
        tensors = source.load(list(names.values()))
        _initialise_buffers(self.model, block)  # while still on meta: only buffers need computing
        for name, full in names.items():
            _set_parameter(block, name, tensors[full].to(self.dtype))
        return block

    def release_block(self, index: int) -> None:
        """Give block ``index``'s memory back; it is read again from shards when needed.

        The grids calibration left on its linears are dropped too: they are in the written shard's
        weights already, and a reloaded block would otherwise carry them as uninitialised memory.
        """
        block = self.blocks[index]
        for module in block.modules():
            for name in KEPT_BUFFERS:
                module._buffers.pop(name, None)
        block.to("meta")

    def outside_state(self) -> dict[str, Tensor]:
        """Every tensor that is not in a block (what the output needs besides the blocks)."""
        inside = {id(p) for p in self.blocks.parameters()}
        return {n: p.detach() for n, p in self.model.named_parameters() if id(p) not in inside}


class ShardWriter:
    """Writes a quantized model as it is produced: one shard per block, then the rest and the index.

    This one writes the fake-quantized weights; :class:`PackedShardWriter` the packed checkpoint.
    """

    def __init__(self, lazy: LazyModel, out_dir: Path) -> None:
        self.lazy, self.out_dir = lazy, Path(out_dir)
        self.weight_map: dict[str, str] = {}
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _save(self, tensors: dict[str, Tensor], filename: str) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.out_dir / filename))
        self.weight_map.update(dict.fromkeys(tensors, filename))

    def block_tensors(self, index: int) -> dict[str, Tensor]:
        """What block ``index`` (in memory, calibrated) contributes to the checkpoint, by checkpoint name."""
        params = dict(self.lazy.blocks[index].named_parameters())
        return {full: params[name] for name, full in self.lazy.block_names(index).items()}

    def write_block(self, index: int) -> None:
        self._save(self.block_tensors(index), f"block-{index:05d}.safetensors")

    def finish(self, tokenizer: PreTrainedTokenizerBase | None) -> Path:
        """Write the tensors outside the blocks, the index, the config and the tokenizer."""
        outside = self.lazy.outside_state()
        if self.lazy.model.config.tie_word_embeddings:
            outside.pop("lm_head.weight", None)
        self._save(outside, "base.safetensors")
        total = sum(f.stat().st_size for f in self.out_dir.glob("*.safetensors"))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        self.lazy.model.config.save_pretrained(self.out_dir)
        generation = self.lazy.source / "generation_config.json"
        if generation.is_file():
            shutil.copy(generation, self.out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.out_dir)
        return self.out_dir


class PackedShardWriter(ShardWriter):
    """Writes the ``pack-quantized`` checkpoint (quant_core.export) a block at a time: the same tensors
    :func:`~quant_core.export.export_pack_quantized` writes for the model in memory."""

    def __init__(self, lazy: LazyModel, out_dir: Path, spec: QuantSpec) -> None:
        super().__init__(lazy, out_dir)
        self.spec = spec
        self.packed: set[str] = set()

    def block_tensors(self, index: int) -> dict[str, Tensor]:
        tensors = super().block_tensors(index)
        for name, layer in quantizable_linears(self.lazy.blocks[index]).items():
            grid = layer_grid(layer)
            if grid is None:
                continue
            full = f"{self.lazy.prefix}.{index}.{name}"
            del tensors[f"{full}.weight"]
            tensors.update(packed_layer(full, layer.weight, grid, self.spec))
            self.packed.add(full)
        return tensors

    def finish(self, tokenizer: PreTrainedTokenizerBase | None) -> Path:
        out = super().finish(tokenizer)
        write_quantization_config(self.lazy.model, self.packed, LayerSchemes(self.spec), out)
        return out


class PackedWeights(ShardedWeights):
    """A packed checkpoint's tensors, each packed layer read as the weight it stands for (what a loader
    dequantizes), so a streamed model is scored from exactly what its packed export holds."""

    def __init__(self, directory: Path, spec: QuantSpec, dtype: torch.dtype) -> None:
        super().__init__(directory)
        self.spec, self.dtype = spec, dtype

    def __contains__(self, name: str) -> bool:
        return name in self.files or f"{name.removesuffix('.weight')}.weight_packed" in self.files

    def load(self, names: list[str]) -> dict[str, Tensor]:
        packed = [name for name in names if name not in self.files]
        tensors = super().load([name for name in names if name in self.files])
        for name in packed:
            prefix = f"{name.removesuffix('.weight')}."
            parts = super().load([key for key in self.files if key.startswith(prefix)])
            tensors[name] = unpacked_weight(
                {k.removeprefix(prefix): v for k, v in parts.items()}, self.spec, self.dtype
            )
        return tensors


class StreamingBlocks:
    """The engine's block residency for a lazy model: load from the source, write out and free after."""

    def __init__(self, lazy: LazyModel, writers: list[ShardWriter]) -> None:
        self.lazy, self.writers = lazy, writers

    def enter(self, index: int) -> None:
        self.lazy.load_block(index)

    def leave(self, index: int) -> None:
        for writer in self.writers:
            writer.write_block(index)
        self.lazy.release_block(index)

    def finish(self, tokenizer: PreTrainedTokenizerBase | None) -> list[Path]:
        """Complete every writer's checkpoint; their folders, in the writers' order."""
        return [writer.finish(tokenizer) for writer in self.writers]


class _Replay(nn.Module):
    """Stands in for a decoder block during the head pass: returns the already computed final hidden state."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *_args: Any, **_kwargs: Any) -> Tensor:
        return self.hidden


@contextlib.contextmanager
def replaced_blocks(lazy: LazyModel, final: Tensor) -> Iterator[None]:
    """While open, every decoder block hands over ``final`` (the last block's output, computed block by
    block): the real model then runs its own final norm and head on it, whatever the architecture."""
    originals = list(lazy.blocks)
    try:
        for i in range(len(originals)):
            lazy.blocks[i] = _Replay(final)
        yield
    finally:
        for i, block in enumerate(originals):
            lazy.blocks[i] = block


@torch.no_grad()
def blockwise_perplexity(
    lazy: LazyModel,
    windows: Tensor,
    weights: ShardedWeights,
    batch_size: int = 4,
    device: str = "cpu",
    on_block: Callable[[int], None] | None = None,
    scored: Tensor | None = None,
    ranks: Ranks = SOLO,
) -> float:
    """Perplexity of the model whose blocks are in ``weights``, streaming one block at a time (over the
    ``scored`` predictions, as :func:`quant_core.perplexity.perplexity` counts them).

    The blocks' hidden states for all windows are carried from block to block; at the end the real
    model runs with every block replaced by a stand-in that hands over those final hidden states, so
    the final norm and head are the model's own whatever the architecture. On several ``ranks`` each
    streams its share of the windows; a rank with none has nothing to run.
    """
    windows, scored = shared_windows(windows, scored, ranks)
    total_nll = 0.0
    if windows.shape[0]:
        captured = capture_block_inputs(lazy.model, windows, device)
        hidden = captured.hidden
        for index, block in enumerate(lazy.blocks):
            lazy.load_block(index, weights).to(device)
            hidden = run_block_batched(block, hidden, captured.kwargs, batch_size)
            lazy.release_block(index)
            if on_block is not None:
                on_block(index)
        batches = zip(scored_batches(windows, scored, batch_size), hidden.split(batch_size), strict=True)
        for (ids, mask), final in batches:
            with replaced_blocks(lazy, final):
                total_nll += scored_nll(lazy.model, ids.to(device), mask).item()
    return ranked_perplexity(total_nll, windows, scored, ranks)
