"""Synthetic data: planted feature caches, DomainNet-layout images and tiny checkpoints."""
