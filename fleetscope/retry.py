"""Capped exponential backoff with full jitter, shared by every retry loop, and the
one-line error text those loops log."""

from __future__ import annotations

import random


class Backoff:
    """Delays of uniform(0, min(cap, base * 2**attempt)) seconds ("full jitter")."""

    def __init__(self, cap: float, base: float = 0.2) -> None:
        self.cap, self.base, self.attempt = cap, base, 0

    def next(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        return delay


def first_line(e: BaseException) -> str:
    """The first line of an error's text (driver errors carry whole server responses)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
