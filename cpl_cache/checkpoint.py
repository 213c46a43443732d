"""Why a checkpoint's weights did not load, in words a user can act on (torch-free at import).

transformers reads weights with safetensors, or with `torch.load(weights_only=True)` for a `.bin`.
A damaged file, or a pickle that holds more than tensors, then fails deep inside those readers,
whose messages run to paragraphs and advise `weights_only=False`, which would run the pickle's
code. `weights_failure` recognises such a failure; `weights_error` words it as one line.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from cpl_cache.errors import UserError

WEIGHTS_ONLY = "only safetensors files or weights-only PyTorch checkpoints load"
_READERS = ("torch/serialization.py", "torch/_weights_only_unpickler.py", "safetensors")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MISMATCH = "weights whose shapes do not match the checkpoint's config.json"


def _raised_in_reader(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if any(part in name for part in _READERS):
            return True
        tb = tb.tb_next
    return False


def _weight_files(id_or_path: str) -> str:
    """The weight files of a local checkpoint folder, by path (or the id itself)."""
    root = Path(id_or_path)
    if not root.is_dir():
        return repr(str(id_or_path))
    files = sorted(str(p) for p in root.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return ", ".join(files) if files else str(root)


def weights_failure(err: BaseException) -> str | None:
    """A short reason when `err` means the weights could not be read; None for any other failure.

    The reason never repeats torch's advice to load with weights_only=False.
    """
    if type(err).__name__ == "SafetensorError":
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"a damaged safetensors file ({first[:160]})" if first else "a damaged safetensors file"
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f" (it refers to {found.group(1)})" if found else ""
        return f"a pickle that is not a weights-only PyTorch checkpoint{what}"
    if isinstance(err, RuntimeError) and "ignore_mismatched_sizes" in str(err):
        return _MISMATCH
    if isinstance(err, (EOFError, OSError, RuntimeError, ValueError)) and _raised_in_reader(err):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = "" if "weights_only" in first else f" ({first[:160]})"
        return f"a truncated or damaged weights file{detail}"
    return None


def weights_error(what: str, id_or_path: str, err: BaseException, hint: str) -> UserError | None:
    """The one-line error for `weights_failure(err)`, naming the weight files; None if it is not one."""
    reason = weights_failure(err)
    if reason is None:
        return None
    rule = "" if reason == _MISMATCH else f"{WEIGHTS_ONLY}, so "
    return UserError(f"cannot load the weights of {what} {_weight_files(id_or_path)}: {reason}; {rule}{hint}")
