"""Bit allocation: functions that return bit maps (and reserve ratios); they never quantize."""
