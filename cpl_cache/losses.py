"""The loss registry of DESIGN.md's Python API (`cpl_cache.losses.LOSSES`); see cpl_cache/train/losses.py."""

from cpl_cache.train.losses import LOSSES, get_loss

__all__ = ["LOSSES", "get_loss"]
