"""The one exception type a user sees: what was wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Iterable


class ConvscopeError(ValueError):
    """Bad input from the user (a name, a path, a file, a value). The CLI turns it into exit status 2."""


def plural(noun: str) -> str:
    """The English plural of a noun phrase's last word: class -> classes, analysis -> analyses, layer -> layers."""
    if noun.endswith("sis"):
        return noun[:-2] + "es"
    if noun.endswith(("s", "x", "sh", "ch")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def unknown(kind: str, name: object, valid: Iterable[object]) -> ConvscopeError:
    """An error for a name that is not one of ``valid``, listing the valid ones."""
    choices = ", ".join(str(v) for v in valid)
    return ConvscopeError(f"unknown {kind} {name!r}; valid {plural(kind)}: {choices}")


MAX_SEED = 2**63 - 1  # torch.Generator takes seeds below 2**64; the training seeds are derived modulo 2**63


def shown(value: object) -> str:
    """A value as an error message shows it: short, and never a 5,000-digit number."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"{'-' if value < 0 else ''}a number of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(value: object, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a whole number in ``lo..hi`` (either end open when None), or an error that says the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConvscopeError(f"{name} must be a whole number, got {shown(value)} ({type(value).__name__})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"from {lo}" if hi is None else f"up to {hi}" if lo is None else f"from {lo} to {hi}"
        raise ConvscopeError(f"{name} must be a whole number {span}, got {shown(value)}")
    return value


def check_float(value: object, name: str, lo: float | None = None, hi: float | None = None,
                open_lo: bool = False, open_hi: bool = False) -> float:
    """``value`` as a finite number in the interval (ends open where asked), or an error that says it."""
    import math

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConvscopeError(f"{name} must be a finite number, got {shown(value)} ({type(value).__name__})")
    below = lo is not None and (value <= lo if open_lo else value < lo)
    above = hi is not None and (value >= hi if open_hi else value > hi)
    if below or above:
        left = "" if lo is None else f"{'above' if open_lo else 'at least'} {lo}"
        right = "" if hi is None else f"{'below' if open_hi else 'at most'} {hi}"
        raise ConvscopeError(f"{name} must be {' and '.join(p for p in (left, right) if p)}, got {shown(value)}")
    return float(value)


def check_seed(value: object, name: str = "seed") -> int:
    return check_int(value, name, 0, MAX_SEED)


def printable(text: object) -> str:
    """Text any page or terminal takes: characters that cannot be written as UTF-8 (the bytes of a file name that
    is not UTF-8, kept by the OS as surrogates) shown escaped."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")
