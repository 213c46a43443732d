"""`cpl_cache.methods.METHODS`, the method registry named in DESIGN.md (see cpl_cache/train/methods.py)."""

from cpl_cache.train.methods import METHODS, Method, get_method

__all__ = ["METHODS", "Method", "get_method"]
