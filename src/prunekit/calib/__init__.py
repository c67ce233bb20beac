"""Calibration: streaming statistics and hooks that are always removed."""
