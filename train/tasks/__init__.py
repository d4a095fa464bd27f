"""Synthetic tasks whose batches carry their own loss_mask (data.source="task"): mqar, listops, passkey, copy.

config.py holds each task's settings (nested in DataConfig), rng.py the counter-based randomness that makes
every example a pure function of (seed, task, split, index), mqar.py / listops.py / passkey.py / copy.py the
generators (each cites its paper), batches.py the training stream and the validation sets per evaluation mix.
Kept import-free so train/data_config.py can import tasks.config without cycles.
"""
