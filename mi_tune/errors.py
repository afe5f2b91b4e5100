"""What the user sees: progress lines on stderr (``log``), errors, and the one place that turns them into exit code 2.

No heavy imports here (no torch): any module may print or raise through it.
"""

from __future__ import annotations

import functools
import sys


def log(msg: str) -> None:
    """One progress line on stderr, prefixed '[mi_tune]' and flushed at once."""
    print(f"[mi_tune] {msg}", file=sys.stderr, flush=True)


class UserError(ValueError):
    """A problem the user can fix (bad recipe, missing file, wrong layer...).

    The message is a full paragraph: what, the value received, what is allowed, how to fix.
    CLIs print it without a traceback and exit with code 2.
    """


def field_error(field: str, value, allowed: str, fix: str) -> str:
    """One problem in the house format: field, value received, what is allowed, how to fix."""
    return f"{field}: got {value!r}; allowed: {allowed}. Fix: {fix}"


def cli_main(fn):
    """Wrap a CLI ``main`` so that a UserError prints one paragraph and exits 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
