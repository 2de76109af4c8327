"""DeepSpeed hostfiles: `megatrain hostfile` writes one from SLURM_JOB_NODELIST (or a list of hosts);
`megatrain launch` reads one (parse_hostfile).

    megatrain hostfile --slots 8 > hostfile                 # inside a Slurm allocation
    megatrain hostfile --nodes "gpu[01-04,09]" --slots 8 --output hostfile

A DeepSpeed hostfile has one line per node, `HOST slots=N` (N = processes, usually GPUs, on that node).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys

from megatrain.fileio import check_output_path, write_atomic


class HostfileError(ValueError):
    pass


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostfileError(f"node list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise HostfileError(f"node list {s!r}: unbalanced '['")
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


MAX_HOSTS = 100_000  # a node list that expands to more is a typo, not a cluster (and would fill memory)


def _expand_one(pattern: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    out = []
    for item in m.group(1).split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise HostfileError(f"node list {pattern!r}: bad range {item!r}")
            if int(hi) - int(lo) >= MAX_HOSTS:
                raise HostfileError(f"node list {pattern!r}: range {item!r} names more than {MAX_HOSTS:,} hosts")
            width = len(lo)  # keep zero padding: 001-010
            values = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
        elif item.isdigit():
            values = [item]
        else:
            raise HostfileError(f"node list {pattern!r}: bad item {item!r}")
        for v in values:
            out.extend(_expand_one(head + v + tail))
            if len(out) > MAX_HOSTS:  # bracket groups multiply: a[0-999][0-999]
                raise HostfileError(f"node list {pattern!r} names more than {MAX_HOSTS:,} hosts")
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (Slurm's hostlist syntax)."""
    hosts = []
    for part in _split_top_level(nodelist):
        hosts += _expand_one(part)
        if len(hosts) > MAX_HOSTS:  # several bracket groups multiply
            raise HostfileError(f"node list {nodelist!r} names more than {MAX_HOSTS:,} hosts")
    if not hosts:
        raise HostfileError(f"node list {nodelist!r} names no host")
    return hosts


# A DNS label (RFC 1123, with '_' as /etc/hosts and Slurm node names allow it); a name is labels joined by dots.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def is_host_address(text: str) -> bool:
    """A host name or an IPv4/IPv6 address, as other machines resolve it (not a typo like 'bad host!' or 10.0.0.300:
    a name's last label is never all digits)."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    return len(text) <= 253 and bool(_HOSTNAME.fullmatch(text)) and not text.rstrip(".").rsplit(".", 1)[-1].isdigit()


def repeated_host(hosts: list[str]) -> int | None:
    """The index of the first host named a second time, or None. The rule launch's hostfile reader and the hostfile
    writer share: one line per node, its processes in slots=N (DeepSpeed's runner refuses a host twice)."""
    seen: set[str] = set()
    for i, h in enumerate(hosts):
        if h in seen:
            return i
        seen.add(h)
    return None


def hostfile_text(hosts: list[str], slots: int, where: str = "host list") -> str:
    """The hostfile launch reads: every host a name or address, each once (parse_hostfile refuses a repeat too).
    `where` names the list in the error line."""
    if slots < 1:
        raise HostfileError(f"--slots must be at least 1, got {slots}")
    for h in hosts:
        if not is_host_address(h):
            raise HostfileError(f"{where}: host {h!r} is not a host name or IP address; list hosts as node1,node2 "
                                f"or a Slurm node list like gpu[01-04]")
    i = repeated_host(hosts)
    if i is not None:
        raise HostfileError(f"{where}: host {hosts[i]} is listed twice; list each node once (--slots gives its "
                            f"processes)")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def parse_hostfile(path: str) -> dict[str, int]:
    """`HOST slots=N` lines (blank lines and # comments allowed) -> {host: slots}, in file order."""
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise HostfileError(f"hostfile {path}: {e.strerror}; write one `HOST slots=N` line per node "
                            f"(`megatrain hostfile` makes one from a Slurm node list)") from None
    entries: list[tuple[int, str, int]] = []  # (line number, host, slots)
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise HostfileError(f"hostfile {path} line {n}: {line!r} is not `HOST slots=N` (N >= 1)")
        entries.append((n, m.group(1), int(m.group(2))))
    if not entries:
        raise HostfileError(f"hostfile {path} names no host; write one `HOST slots=N` line per node")
    i = repeated_host([h for _, h, _ in entries])
    if i is not None:
        raise HostfileError(f"hostfile {path} line {entries[i][0]}: host {entries[i][1]} is listed twice")
    return {h: slots for _, h, slots in entries}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", default=None, help="a Slurm node list or comma-separated hosts (default: $SLURM_JOB_NODELIST)")
    p.add_argument("--slots", type=int, default=None, help="processes per node (default: $SLURM_GPUS_ON_NODE, else 1)")
    p.add_argument("--output", default="-", help="file to write (default: standard output)")


def command(args: argparse.Namespace) -> int:
    if args.output != "-":
        check_output_path(args.output, "--output", example="hostfile")
    nodes = args.nodes or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        raise HostfileError("no node list: pass --nodes, or run inside a Slurm allocation (SLURM_JOB_NODELIST)")
    slots = args.slots if args.slots is not None else int(os.environ.get("SLURM_GPUS_ON_NODE", "1") or 1)
    source = "--nodes" if args.nodes else "SLURM_JOB_NODELIST" if os.environ.get("SLURM_JOB_NODELIST") else \
        "SLURM_NODELIST"
    text = hostfile_text(expand_nodelist(nodes), slots, f"{source} {nodes!r}")
    if args.output == "-":
        sys.stdout.write(text)
    else:
        write_atomic(args.output, text)
    return 0
