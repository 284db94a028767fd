"""Quantization methods, registered by name. Importing this package registers all of them."""

from quant_core.methods import omniquant, rtn
from quant_core.methods.base import METHODS, BlockData, QuantMethod, build_method, register_method

__all__ = ["METHODS", "BlockData", "QuantMethod", "build_method", "omniquant", "register_method", "rtn"]
