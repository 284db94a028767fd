"""Quantization methods, registered by name. Importing this package registers all of them."""

from quant_core.methods import awq, discquant, gptq, normtweaking, omniquant, rtn, tesseraq
from quant_core.methods.base import METHODS, BlockData, QuantMethod, build_method, register_method

__all__ = [
    "METHODS",
    "BlockData",
    "QuantMethod",
    "awq",
    "build_method",
    "discquant",
    "gptq",
    "normtweaking",
    "omniquant",
    "register_method",
    "rtn",
    "tesseraq",
]
