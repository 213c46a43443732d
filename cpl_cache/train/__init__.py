"""Stage two: train heads from the feature cache in seconds.

`heads.py` (proto, linear), `losses.py` (soft, hard, kd, auxconf, augconf, adaptconf), `methods.py`
(the registry behind `--method`, with every default) and `trainer.py` (one loop for all of them,
`TrainConfig` and `run_training`). Importing this package imports torch; the CLI does so lazily.
"""
