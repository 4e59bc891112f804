"""The group size a matrix gets when none is asked for."""

from __future__ import annotations

DEFAULT_GROUP = 64
DEFAULT_GROUP_RANGE = (32, 128)  # where DEFAULT_GROUP does not divide, a divisor in this range is used


def default_group_size(in_features: int) -> int:
    """The group of a matrix with `in_features` inputs when none was asked for: DEFAULT_GROUP where it divides,
    else the divisor of in_features in DEFAULT_GROUP_RANGE closest to it (the smaller on a tie), else one group
    per row (in_features)."""
    if in_features % DEFAULT_GROUP == 0:
        return DEFAULT_GROUP
    lo, hi = DEFAULT_GROUP_RANGE
    divisors = [g for g in range(lo, min(hi, in_features) + 1) if in_features % g == 0]
    return min(divisors, key=lambda g: (abs(g - DEFAULT_GROUP), g)) if divisors else in_features
