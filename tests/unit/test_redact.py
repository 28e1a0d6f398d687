"""Secrets in command lines are masked on the node, per distinct candidate value only."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from node_agent.columns import argv_strings
from node_agent.redact import DEFAULT_PATTERNS, Redactor, required_literals

CASES = [
    (b"mysql --password=hunter2 -u root", b"mysql --password=*** -u root"),
    (b"PGPASSWORD=a1 psql -h db", b"PGPASSWORD=*** psql -h db"),
    (b"env AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG ./deploy", b"env AWS_SECRET_ACCESS_KEY=*** ./deploy"),
    (b"app --token s3cr3t --verbose", b"app --token *** --verbose"),
    (b"app -client-secret s3cr3t", b"app -client-secret ***"),
    (b"tool --api-key=XYZ --api_key=Q", b"tool --api-key=*** --api_key=***"),
    (b"curl -H Authorization: Bearer eyJabc.def", b"curl -H Authorization: Bearer ***"),
    (b"curl -H Authorization: Basic dXNlcjpwYXNzd29yZA==", b"curl -H Authorization: Basic ***"),
    (b"git clone https://bob:pa55@git.example.com/r.git", b"git clone https://bob:***@git.example.com/r.git"),
    (b"gh auth --with ghp_" + b"a" * 36, b"gh auth --with ***"),
    (b"x eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-nature_1", b"x ***"),
    (b"PASSWORD=\xff\xfebinary rest", b"PASSWORD=*** rest"),  # not UTF-8: bytes kept as they were
]
UNTOUCHED = [
    b"ls -l /etc",
    b"echo tokenizer keyboard",
    b"python -m http.server",
    b"ssh user@host",
    b"grep -r password src/",  # the word alone is no secret
    b"app --token",  # a flag without a value
    b"app --token --verbose",  # the next argument is a flag
]


def test_defaults_mask_the_value_and_keep_the_rest() -> None:
    col = np.array([c for c, _ in CASES] + UNTOUCHED)
    out, n = Redactor(DEFAULT_PATTERNS).redact(col)
    assert n == len(CASES)
    assert out.tolist() == [want for _, want in CASES] + UNTOUCHED


def test_every_default_pattern_has_a_literal_for_the_prefilter() -> None:
    for p in DEFAULT_PATTERNS:
        assert required_literals(p), p


@pytest.mark.parametrize(
    ("pattern", "literals"),
    [
        (r"(?i)\bbearer\s+(\S+)", {"bearer"}),
        (r"(?:foo|bar)baz=(\S+)", {"baz="}),  # the longest fixed string wins
        (r"(?:foo|bar)\d", {"foo", "bar"}),  # else one of the alternatives
        (r"abc(?:de)?f", {"abc"}),
        (r"ab+c", {"a"}),  # single characters tie: the first
        (r"[a-z]+=\d+", {"="}),
        (r"\w+", None),  # nothing fixed: every row is a candidate
        (r"(?:x|\d)y", {"y"}),
    ],
)
def test_required_literals(pattern: str, literals: set[str] | None) -> None:
    assert required_literals(pattern) == (frozenset(literals) if literals else None)


def test_candidates_are_a_superset_of_the_matches() -> None:
    rng = np.random.default_rng(7)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ =:-_/@.", np.uint8)
    words = [b"password=", b"Token ", b"--SECRET ", b"bearer ", b"https://u:p@h", b"api_key="]
    rows = []
    for _ in range(5000):
        raw = alphabet[rng.integers(0, len(alphabet), 40)].tobytes()
        if rng.random() < 0.3:
            w = words[rng.integers(0, len(words))]
            at = int(rng.integers(0, 30))
            raw = raw[:at] + w + raw[at:]
        rows.append(raw)
    col = np.array(rows)
    r = Redactor(DEFAULT_PATTERNS)
    cand = r.candidates(col)
    matching = np.array([any(p.search(v.decode()) for p in r.patterns) for v in col.tolist()])
    assert not (matching & ~cand).any()  # no match outside the candidates
    assert cand.sum() < len(col)  # and the prefilter does filter


def test_a_custom_pattern_without_literal_still_works() -> None:
    r = Redactor([r"\d{4}-\d{4}-\d{4}-(\d{4})"])
    out, n = r.redact(np.array([b"pay 1234-5678-9012-3456 now", b"nothing"]))
    assert (out.tolist(), n) == ([b"pay 1234-5678-9012-*** now", b"nothing"], 1)


def test_no_patterns_no_redaction_and_column_unchanged() -> None:
    col = np.array([b"mysql --password=x"])
    out, n = Redactor([]).redact(col)
    assert out is col and n == 0
    out, n = Redactor(DEFAULT_PATTERNS).redact(np.array([b"ls", b"cat"]))
    assert n == 0


def test_masked_value_may_be_longer_than_the_column() -> None:
    out, n = Redactor(DEFAULT_PATTERNS).redact(np.array([b"pwd=1 password=a", b"x"]))
    assert out.tolist() == [b"pwd=1 password=***", b"x"] and n == 1


def test_redaction_of_argv_records_is_cheap() -> None:
    """16384 exec records of 512-byte argv, 1% with a secret: the prefilter keeps the regexes
    to a few hundred distinct values."""
    rows, width = 16384, 512
    rng = np.random.default_rng(1)
    args = np.zeros(rows, f"S{width}")
    base = [b"/usr/bin/python3\0-m\0worker\0--queue\0q%d\0" % i for i in range(rows)]
    for i in rng.choice(rows, rows // 100, replace=False):
        base[i] += b"--password=x%d\0" % i
    args[:] = base
    lens = np.char.str_len(args).astype("<u4") + 1
    col = argv_strings(args, lens)
    r = Redactor(DEFAULT_PATTERNS)
    started = time.perf_counter()
    out, n = r.redact(col)
    took = time.perf_counter() - started
    assert n == rows // 100
    assert not any(re.search(rb"password=x\d", v) for v in out.tolist())
    print(f"redact {rows} rows: {took * 1e3:.1f} ms")
    assert took < 0.5


def test_repeated_values_are_masked_in_every_row_and_merge_once_masked() -> None:
    """Redaction runs per distinct value: every row repeating a secret is masked and counted,
    and two secrets that mask alike end up as one dictionary entry."""
    from fleetscope.codec import pack_strings, string_dictionary

    values = [b"app --password=a", b"ls", b"app --password=b", b"app --password=***", b"ls", b"app --password=a"]
    col = np.array(values * 1000)
    r = Redactor(DEFAULT_PATTERNS)
    out, n = r.redact(col)
    assert n == 3000  # the rows that changed: "=a" twice and "=b" once per repetition
    assert out.tolist() == [b"app --password=***", b"ls", b"app --password=***", b"app --password=***", b"ls",
                            b"app --password=***"] * 1000  # fmt: skip
    entries, index, rows = r.redact_dictionary(*string_dictionary(col))
    assert rows == 3000
    # "=a" and "=b" masked into one entry; the command line that already read "=***" keeps its own
    assert sorted(entries.tolist()) == [b"app --password=***", b"app --password=***", b"ls"]
    assert entries[index].tolist() == out.tolist()
    data, offsets = pack_strings(entries)
    assert len(data) == int(offsets[-1]) == len(b"app --password=***app --password=***ls")
