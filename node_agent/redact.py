"""Redaction of secrets in captured command lines, on the node, before a batch is built.

A pattern is a regular expression; where it matches, the text of its first group (or the
whole match if it has none) becomes ``***``. The defaults catch ``password=...``,
``AWS_SECRET_ACCESS_KEY=...``, ``--token VALUE``, ``Bearer ...``, URL passwords
(``https://user:***@host``) and GitHub and JSON Web tokens; ``redact_patterns`` replaces them.

Cost: no regular expression ever runs per row. Every match of a pattern contains one of a
few literal strings, read from the pattern itself (``password``, ``token``, ``://``...); a
vectorised search for those literals over the fixed-width bytes (ASCII case folded with a
table lookup) picks the candidate rows, and the patterns run once per distinct candidate
value. A pattern without such a literal makes every row a candidate (still once per
distinct value).
"""

from __future__ import annotations

import re
import re._constants as sre_c  # the parser's opcodes (Python 3.11+)
import re._parser as sre_parse
from collections.abc import Iterable, Sequence

import numpy as np

from fleetscope.codec import string_dictionary
from fleetscope.config import DEFAULT_REDACT_PATTERNS

__all__ = ["DEFAULT_PATTERNS", "MASK", "Redactor", "required_literals"]

MASK = b"***"

# the defaults live with the settings (fleetscope.config), which load without numpy
DEFAULT_PATTERNS = DEFAULT_REDACT_PATTERNS

# ASCII case folding as a byte table: one np.take per batch folds every byte
_FOLD = np.arange(256, dtype=np.uint8)
_FOLD[ord("A") : ord("Z") + 1] += 32

_REPEATS = (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, getattr(sre_c, "POSSESSIVE_REPEAT", sre_c.MAX_REPEAT))


def _literal_sets(items: Iterable[tuple[object, object]]) -> list[frozenset[str]]:
    """Sets S of a parsed sequence such that every match contains at least one string of S."""
    out: list[frozenset[str]] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            out.append(frozenset({"".join(run)}))
            run.clear()

    for op, av in items:
        if op is sre_c.LITERAL:
            run.append(chr(av))  # type: ignore[arg-type]
            continue
        flush()
        if op is sre_c.SUBPATTERN:
            out += _literal_sets(av[-1])  # type: ignore[index]
        elif op in _REPEATS and av[0] >= 1:  # type: ignore[index]
            out += _literal_sets(av[2])  # type: ignore[index]
        elif op is getattr(sre_c, "ATOMIC_GROUP", None):
            out += _literal_sets(av)  # type: ignore[arg-type]
        elif op is sre_c.BRANCH:
            alternatives = [_best(_literal_sets(branch)) for branch in av[1]]  # type: ignore[index]
            if all(a is not None for a in alternatives):
                out.append(frozenset().union(*alternatives))  # type: ignore[arg-type]
        # anything else (a class, ".", an anchor, a look-around) matches no fixed text
    flush()
    return out


def _best(sets: list[frozenset[str]]) -> frozenset[str] | None:
    """The most selective set: the one whose shortest string is longest."""
    return max(sets, key=lambda s: (min(len(x) for x in s), -len(s)), default=None)


def required_literals(pattern: str) -> frozenset[str] | None:
    """Strings one of which every match of pattern contains (ASCII lower-cased), or None
    when the pattern guarantees none."""
    found = _best(_literal_sets(sre_parse.parse(pattern)))
    return frozenset(s.lower() for s in found) if found else None


def _masked(m: re.Match[str]) -> str:
    """The match with its first group (or all of it) replaced by the mask."""
    start, end = m.span(1) if m.re.groups and m.start(1) >= 0 else m.span(0)
    text, base = m[0], m.start()
    return text[: start - base] + MASK.decode() + text[end - base :]


class Redactor:
    """Masks secrets in fixed-width byte-string columns ('S<n>' arrays)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        """patterns: regular expressions (re syntax); raises re.error for a bad one."""
        self.patterns = tuple(re.compile(p) for p in patterns)
        literals: set[bytes] = set()
        self._scan_all = False
        for p in patterns:
            found = required_literals(p)
            if found is None:
                self._scan_all = True
            else:
                literals |= {s.encode() for s in found}
        # a literal that contains another adds nothing to the search
        self._literals = sorted(s for s in literals if not any(o != s and o in s for o in literals))

    def candidates(self, col: np.ndarray) -> np.ndarray:
        """Boolean mask of the rows that may hold a secret (a superset of those that do)."""
        if not self.patterns or len(col) == 0:
            return np.zeros(len(col), bool)
        if self._scan_all:
            return np.ones(len(col), bool)
        width = col.dtype.itemsize
        folded = np.take(_FOLD, np.ascontiguousarray(col).view(np.uint8)).view(f"S{width}")
        hit = np.zeros(len(col), bool)
        for lit in self._literals:
            if len(lit) <= width:
                hit |= np.strings.find(folded, lit) >= 0
        return hit

    def redact(self, col: np.ndarray) -> tuple[np.ndarray, int]:
        """col with secrets masked, and how many rows changed. The input is not modified; a
        column with nothing to mask comes back as it is."""
        if not self.patterns or len(col) == 0:
            return col, 0
        entries, index = string_dictionary(col)
        masked, index, rows = self.redact_dictionary(entries, index)
        if not rows:
            return col, 0
        return masked.astype(f"S{max(col.dtype.itemsize, masked.dtype.itemsize)}")[index], rows

    def redact_dictionary(self, entries: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """A dictionary-encoded column (distinct 'S<n>' entries, each row's entry) with secrets
        masked: (entries, index, rows changed). The candidate search and the patterns run
        once per distinct value, however many rows repeat it. Masked values that became equal
        are merged into one entry (one that equals an unmasked entry, i.e. a command line that
        already held the mask, stays a second entry of the same text: the rows are the same);
        nothing to mask returns the inputs as they are."""
        changed, new = [], []
        candidates = np.flatnonzero(self.candidates(entries))
        for j, raw in zip(candidates.tolist(), entries[candidates].tolist(), strict=True):
            text = raw.decode("utf-8", "surrogateescape")
            out = text
            for p in self.patterns:
                out = p.sub(_masked, out)
            if out != text:
                changed.append(j)
                new.append(out.encode("utf-8", "surrogateescape"))
        if not changed:
            return entries, index, 0
        hit = np.zeros(len(entries), bool)
        hit[changed] = True
        rows = int(np.count_nonzero(hit[index]))
        # two secrets masked alike ("password=a", "password=b") are one value now: later
        # entries of a masked value point at its first and are dropped
        first: dict[bytes, int] = {}
        target = np.arange(len(entries))
        for j, v in zip(changed, new, strict=True):
            target[j] = first.setdefault(v, j)
        width = max(entries.dtype.itemsize, max(len(v) for v in first))
        masked = entries.astype(f"S{width}")
        masked[list(first.values())] = list(first)
        keep = target == np.arange(len(entries))
        renumber = (np.cumsum(keep) - 1).astype("<u4")
        return masked[keep], renumber[target][index], rows
