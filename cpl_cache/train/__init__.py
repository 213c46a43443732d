"""Stage two: train heads from the feature cache in seconds.

`heads.py` (proto, linear, prompt via `prompt.py`), `losses.py` (every loss, `LOSSES`), `methods.py`
(the registry behind `--method`, with every hyperparameter's default) and `trainer.py` (one loop for
all of them, cells of a domain stacked; `TrainConfig` and `run_training`). Importing this package
imports torch; the CLI does so lazily.
"""
