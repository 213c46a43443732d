"""Stage one: decode every image once, run CLIP and the weak model on it, write HDF5 shards.

reader.py decodes and preprocesses in DataLoader workers, mapper.py runs both networks, writer.py
owns shards, the manifest and resuming, runner.py ties them together behind `run_extract`.
"""

from cpl_cache.extract.runner import ExtractConfig, run_extract

__all__ = ["ExtractConfig", "run_extract"]
