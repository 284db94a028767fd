"""The floating-point types a job names, and which of them can store a grid, without torch.

A request names the model's dtype and the checkpoint's (quant_core.export_dtype); whether a stored
weight still tells its code is checked where the request enters, which must not load torch.
"""

from __future__ import annotations

from typing import Literal, get_args

# Dtype the model is loaded and run in. Quantization parameters, Hessians and losses stay in float32
# whatever this is; bfloat16 halves the memory of weights and activations on a GPU.
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
# ``auto``: float16 for a model declared float16 (its values may need float16's finer steps), bfloat16
# for every other (a bfloat16 model stays exact; a float32 one is halved).
ExportDtypeName = Literal["auto", "bfloat16", "float16", "float32"]
EXPORT_DTYPES: tuple[str, ...] = get_args(ExportDtypeName)
SIGNIFICAND_BITS = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}


def holds_grid(dtype: str, bits: int, symmetric: bool) -> bool:
    """Whether a weight ``(code - zero) * scale`` stored in ``dtype`` still tells its code.

    Rounding to a dtype of ``p`` significant bits moves a value by up to ``2^-p`` of itself, so the code
    read back from the stored weight is the right one while ``|code - zero| * 2^-p < 1/2``. The offsets
    are at most ``2^b - 1`` on an asymmetric grid and ``2^(b-1) - 1`` on a symmetric one (its far end
    ``-2^(b-1)`` is a power of two, exact in any dtype). bfloat16 (8 bits) holds every grid up to
    7 bits and symmetric 8-bit, not asymmetric 8-bit: one weight in a hundred of a one-sided group
    would come back a code away, some past the grid's end.
    """
    largest_offset = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    return largest_offset < 2 ** (SIGNIFICAND_BITS[dtype] - 1)
