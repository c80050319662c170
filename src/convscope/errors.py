"""The one exception type a user sees: what was wrong and what to do about it."""

from __future__ import annotations

from collections.abc import Iterable


class ConvscopeError(ValueError):
    """Bad input from the user (a name, a path, a file, a value). The CLI turns it into exit status 2."""


def unknown(kind: str, name: object, valid: Iterable[object]) -> ConvscopeError:
    """An error for a name that is not one of ``valid``, listing the valid ones."""
    choices = ", ".join(str(v) for v in valid)
    return ConvscopeError(f"unknown {kind} {name!r}; valid {kind}s: {choices}")
