"""`fleetscope agent --check`: which probes load on this kernel with which loader, and why not.

Each probe is actually loaded, attached and closed with each loader (cheap: small rings,
nothing read), so the answer is the kernel's and the verifier's, not a guess.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from fleetscope.config import AgentOptions
from node_agent import capabilities
from node_agent.bcc_loader import (
    TRACEFS_DIRS,
    VMLINUX_BTF,
    BccProbe,
    BccUnavailable,
    import_bcc,
    load_probe_bcc,
    resolve_loader,
)
from node_agent.errors import ProbeError
from node_agent.loader import LoadedProbe, load_probe
from node_agent.probes import ProbeSettings, all_probes

__all__ = ["LOADERS", "check", "kernel_summary"]

LOADERS = ("libbpf", "bcc")
CHECK_RING_BYTES = 1 << 16  # enough for one record of every probe; nothing is read


def kernel_summary() -> list[str]:
    """What the loaders depend on: kernel BTF, tracefs, bcc."""
    uname = os.uname()
    btf = f"btf yes ({VMLINUX_BTF})" if VMLINUX_BTF.exists() else f"btf no ({VMLINUX_BTF} missing)"
    mounted = next((d for d in TRACEFS_DIRS if (d / "events").is_dir()), None)
    tracefs = f"tracefs at {mounted}" if mounted else "tracefs not mounted (classic tracepoints: no)"
    try:
        bcc = f"bcc {getattr(import_bcc(), '__version__', '(version unknown)')}"
    except (ImportError, OSError) as e:
        bcc = f"bcc unavailable ({e})"
    lacking = capabilities.missing()
    caps = f"capabilities: missing {', '.join(lacking)}" if lacking else "capabilities: CAP_BPF and CAP_PERFMON present"
    return [f"kernel {uname.release} ({uname.machine}): {btf}, {tracefs}, {bcc}; {caps}"]


def _one_line(e: ProbeError) -> str:
    """The reason in one line: the message's first line, plus the log's verdict (last line)."""
    if isinstance(e, BccUnavailable):
        return e.reason
    first, *rest = str(e).splitlines() or [""]
    verdict = next((line.strip() for line in reversed(rest) if line.strip()), "")
    return f"{first} ({verdict})" if verdict else first


def _try(loader: str, name: str, settings: ProbeSettings) -> str:
    """Load, attach and close one probe; "ok ..." with the programs attached, or why not."""
    if loader == "libbpf" and not VMLINUX_BTF.exists():
        return f"unavailable: the kernel has no BTF ({VMLINUX_BTF}): CO-RE objects cannot relocate"
    load: Callable[[str, ProbeSettings], LoadedProbe | BccProbe] = load_probe if loader == "libbpf" else load_probe_bcc
    try:
        with load(name, settings) as probe:
            notes = probe.retargeted if isinstance(probe, BccProbe) else {}
            attached = ", ".join(
                f"{hook} via {program}" + (f" ({notes[hook]})" if hook in notes else "")
                for hook, program in sorted(probe.attached.items())
            )
    except ProbeError as e:
        return f"unavailable: {_one_line(e)}"
    return f"ok: {attached}"


def check(settings: AgentOptions, probes: Sequence[str] | None = None) -> tuple[list[str], int]:
    """Report lines and an exit code: 0 when every configured probe (settings.probes) loads
    with the loader settings.loader selects here, 1 otherwise. probes: which to try (all)."""
    trial = dataclasses.replace(settings, ring_bytes=CHECK_RING_BYTES)
    selected = resolve_loader(settings.loader)
    lines = kernel_summary()
    why = "" if settings.loader != "auto" else (" (kernel btf)" if selected == "libbpf" else " (no kernel btf)")
    lines.append(f"loader {settings.loader}: {selected}{why}; probes configured: {', '.join(settings.probes)}")
    names = list(probes) if probes is not None else sorted(all_probes())
    width = max((len(n) for n in names), default=0)
    failed = False
    for name in names:
        for loader in LOADERS:
            result = _try(loader, name, trial)
            lines.append(f"{name:<{width}}  {loader:<6}  {result}")
            if loader == selected and name in settings.probes and not result.startswith("ok"):
                failed = True
    return lines, 1 if failed else 0
