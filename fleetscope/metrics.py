"""Prometheus text exposition (format 0.0.4) for the agent's and the ingester's /metrics.

Small on purpose: the processes keep their counters where they already are (Counters,
stats objects) and render them on request; nothing is registered globally, so tests and
the single-node mode can run several components in one process.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class Histogram:
    """Cumulative buckets of observed values (e.g. insert latency in seconds)."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Exposition:
    """Collects metric families, then renders them; one instance per scrape."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def _family(self, name: str, kind: str, help_text: str) -> list[str]:
        full = f"{self.prefix}_{name}"
        if full not in self._families:
            self._families[full] = (kind, help_text, [])
        return self._families[full][2]

    @staticmethod
    def _labels(labels: Labels | None, extra: tuple[str, str] | None = None) -> str:
        items = [*(labels or {}).items(), *([extra] if extra else [])]
        if not items:
            return ""
        return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in items) + "}"

    def counter(self, name: str, help_text: str, value: float, labels: Labels | None = None) -> None:
        """A monotonic count; `name` without the _total suffix, which is added."""
        self._family(f"{name}_total", "counter", help_text).append(
            f"{self.prefix}_{name}_total{self._labels(labels)} {_number(value)}"
        )

    def gauge(self, name: str, help_text: str, value: float, labels: Labels | None = None) -> None:
        self._family(name, "gauge", help_text).append(f"{self.prefix}_{name}{self._labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, hist: Histogram, labels: Labels | None = None) -> None:
        lines = self._family(name, "histogram", help_text)
        full, running = f"{self.prefix}_{name}", 0
        for bound, n in zip([*hist.bounds, math.inf], hist.counts, strict=True):
            running += n
            lines.append(f"{full}_bucket{self._labels(labels, ('le', _number(bound)))} {running}")
        lines.append(f"{full}_sum{self._labels(labels)} {_number(hist.sum)}")
        lines.append(f"{full}_count{self._labels(labels)} {hist.count}")

    def render(self) -> str:
        out: list[str] = []
        for name, (kind, help_text, lines) in self._families.items():
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]
        return "\n".join(out) + "\n"


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of an exposition by (name, labels): for tests and `--status`-like readers."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, rest = series.partition("{")
        labels: list[tuple[str, str]] = []
        rest = rest.rstrip("}")
        while rest:
            key, _, rest = rest.partition('="')
            val, i = [], 0
            while rest[i] != '"':
                if rest[i] == "\\":
                    i += 1
                    val.append({"n": "\n"}.get(rest[i], rest[i]))
                else:
                    val.append(rest[i])
                i += 1
            labels.append((key, "".join(val)))
            rest = rest[i + 1 :].lstrip(",")
        out[name, frozenset(labels)] = float(value)
    return out
