"""Credits as people write them <-> integer micro-credits as we store them."""
from decimal import Decimal, InvalidOperation

from models import MICRO

# One typed amount (a price, grant, limit, code): a billion credits is beyond any real use,
# and sums of such amounts stay far inside the 64-bit columns money is stored in.
MAX_CREDITS = 1_000_000_000
MAX_MULTIPLIER = 1000


def parse_credits(text, allow_negative=False, maximum=MAX_CREDITS):
    """'1.5' -> 1_500_000. Raises ValueError for junk, >6 decimals, more than `maximum`
    credits either way, or (by default) negatives."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"not a number of credits: {text!r}") from None
    if not value.is_finite():
        raise ValueError(f"not a number of credits: {text!r}")
    if abs(value) > maximum:
        raise ValueError(f"at most {maximum:,} credits: {text!r}")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise ValueError(f"at most 6 decimal places: {text!r}")
    if micro < 0 and not allow_negative:
        raise ValueError(f"must not be negative: {text!r}")
    return int(micro)


def format_credits(micro, places=6):
    """1_500_000 -> '1.5'; exact, trailing zeros trimmed; `places` rounds for display."""
    micro = int(micro or 0)
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    frac_text = f"{frac:06d}"[:places].rstrip("0")
    return f"{sign}{whole}" + (f".{frac_text}" if frac_text else "")


def parse_ratio_ppm(text):
    """A multiplier like '1.25' -> parts per million (1_250_000)."""
    return parse_credits(text, maximum=MAX_MULTIPLIER)  # same fixed-point scale, same rules
