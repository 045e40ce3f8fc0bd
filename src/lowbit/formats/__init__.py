"""Number formats: pure fit -> quantize -> dequantize functions on weight groups."""
from .base import Format, GroupLayout, ParamSpec, group_layout
from .registry import format_names, make_format, preset, preset_tag, register_format, register_preset
from .integer import IntFormat
from .table import TableFormat
from .fp import FPFormat
from .nf import NFFormat
from .kquant import KQuantFormat
from .mx import MXFormat, NVFP4Format
from .e8p import E8PFormat
from .quantize import QuantizedWeight, quantize_rtn

__all__ = [
    "Format", "GroupLayout", "ParamSpec", "group_layout", "format_names", "make_format", "preset", "preset_tag",
    "register_format", "register_preset", "IntFormat", "TableFormat", "FPFormat", "NFFormat", "KQuantFormat",
    "MXFormat", "NVFP4Format", "E8PFormat", "QuantizedWeight", "quantize_rtn",
]
