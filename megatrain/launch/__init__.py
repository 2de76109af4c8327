"""Helpers for launching on clusters: Slurm node lists, DeepSpeed hostfiles."""
