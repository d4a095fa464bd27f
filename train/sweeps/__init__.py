"""Sweeps: an experiment's SWEEP (variants x grid x learning rates x seeds) as ordinary runs under one directory.

spec.py (the plan), store.py (the directory contract), local.py / ray_engine.py (the engines), report.py.
"""
