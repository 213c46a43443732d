"""cpl-cache: weak-to-strong generalization for CLIP-based classification, from a feature cache."""

__version__ = "0.1.0"
