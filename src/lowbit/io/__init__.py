"""Checkpoint save/load."""
from .checkpoint import check_out_path, is_checkpoint, load_checkpoint, read_meta, save_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "is_checkpoint", "read_meta", "check_out_path"]
