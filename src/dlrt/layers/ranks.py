"""The one rank validator: every place that accepts a rank for a weight matrix checks it here."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["check_rank", "rank_range"]


def check_rank(
    rank: Any,
    shape: Sequence[int],
    *,
    what: str = "rank",
    layer: str | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
) -> int:
    """Check that ``rank`` is a valid rank of an ``n×m`` weight matrix and return it as an int.

    A valid rank is an integer with ``1 <= rank <= min(n, m)``; ``min_rank``
    and ``max_rank``, when given, narrow that range (a ``max_rank`` above the
    full rank is capped at it). The message of a failure names ``what``, its
    value, the layer and the valid range, so the caller can pass its own
    parameter name (``"r"``, ``"max_rank"`` …) and the module name.

    Args:
        rank: the value to check.
        shape: ``(n, m)`` of the weight matrix (for a convolution
            ``(out, in·kh·kw)``).
        what: the name of the parameter, as the caller's user spells it.
        layer: the module name, for the message.
        min_rank, max_rank: further bounds of the valid range.

    Returns:
        ``int(rank)``.

    Raises:
        TypeError: ``rank`` is not an integer (``bool`` and ``float`` included).
        ValueError: ``rank`` is out of range, or ``min_rank`` > ``max_rank``.
    """
    n, m = (int(d) for d in shape)
    where = f"layer {layer!r} ({n}×{m})" if layer is not None else f"a {n}×{m} weight matrix"
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {rank!r} ({type(rank).__name__}) for {where}")
    lo, hi = rank_range((n, m), min_rank=min_rank, max_rank=max_rank)
    notes = [f"full rank min({n}, {m}) = {min(n, m)}"]
    if lo > 1:
        notes.append(f"min_rank={min_rank}")
    if hi < min(n, m):
        notes.append(f"max_rank={max_rank}")
    if lo > hi:
        raise ValueError(f"no {what} fits {where}: the bounds are empty ({', '.join(notes)})")
    if not lo <= rank <= hi:
        raise ValueError(
            f"{what}={rank} is out of range for {where}: it must satisfy {lo} <= {what} <= {hi} ({', '.join(notes)})"
        )
    return int(rank)


def rank_range(shape: Sequence[int], *, min_rank: int | None = None, max_rank: int | None = None) -> tuple[int, int]:
    """``(lo, hi)``: the ranks :func:`check_rank` accepts for an ``n×m`` matrix (empty when ``lo > hi``)."""
    full = min(int(d) for d in shape)
    lo = max(1, int(min_rank)) if min_rank is not None else 1
    hi = min(full, int(max_rank)) if max_rank is not None else full
    return lo, hi
