"""Formats shared by every part: the dtype table and streaming safetensors I/O (numpy only)."""

from .dtypes import BY_NAME, DTYPES, DType, from_numpy, st_name
from .safetensors import SafetensorsFile, StreamWriter, TensorInfo, TensorSpec, load_file, read_header, save_file

__all__ = ["BY_NAME", "DTYPES", "DType", "from_numpy", "st_name", "SafetensorsFile", "StreamWriter",
           "TensorInfo", "TensorSpec", "load_file", "read_header", "save_file"]
