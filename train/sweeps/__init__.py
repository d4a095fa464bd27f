"""Sweeps: many ordinary runs of one study (plan, run, status) and the reports over their files."""
