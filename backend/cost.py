"""The seed's cost formula, in exact decimal arithmetic."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

CENT = Decimal("0.01")


def render_cost(
    images: int,
    video_seconds: float | Decimal,
    *,
    price_per_image: Decimal = Decimal("0.003"),
    price_per_second: Decimal = Decimal("0.10"),
) -> Decimal:
    """images x image price + seconds x video price, rounded half-up to cents.

    >>> render_cost(5, 10)
    Decimal('1.02')
    """
    # str() first: Decimal(float) would carry the float's binary error into the rounding.
    seconds = video_seconds if isinstance(video_seconds, Decimal) else Decimal(str(video_seconds))
    total = images * price_per_image + seconds * price_per_second
    return total.quantize(CENT, rounding=ROUND_HALF_UP)
