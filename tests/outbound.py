"""What a command reaches beyond this machine, seen with strace: each address a process of it connects or sends
to that is not loopback, and each DNS query, to a resolver on loopback too (a local stub, such as
systemd-resolved's at 127.0.0.53, forwards it), or through systemd-resolved's own socket.

strace -f follows every process the command starts; --seccomp-bpf stops them only at the four calls traced,
so the pipeline runs at about its usual speed under it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

CALLS = "trace=connect,sendto,sendmsg,sendmmsg"
# An IPv4 or IPv6 socket address as strace prints it, e.g. {sa_family=AF_INET, sin_port=htons(53),
# sin_addr=inet_addr("10.0.0.53")} or {sa_family=AF_INET6, sin6_port=htons(443), ..., inet_pton(AF_INET6, "::1", ...
INET_ADDRESS = re.compile(r'sa_family=AF_INET6?, sin6?_port=htons\((\d+)\), [^}]*?"([^"]+)"')
RESOLVER_SOCKET = "/run/systemd/resolve/"  # glibc's nss-resolve asks systemd-resolved there, not on port 53
DNS_PORT = "53"


@cache
def unusable() -> str | None:
    """Why strace cannot trace here (not installed, or the sandbox refuses ptrace), or None when it can."""
    strace = shutil.which("strace")
    if strace is None:
        return "strace is needed to trace what the pipeline connects to: apt-get install strace, or `make strace`"
    probe = subprocess.run([strace, "-f", "--seccomp-bpf", "-e", CALLS, "-o", os.devnull, "true"], capture_output=True)
    if probe.returncode != 0:
        return f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip().splitlines()[-1]}"
    return None


def require() -> None:
    """Skip without a working strace; in CI, fail, as the other tests that need a tool do."""
    if (why := unusable()) is not None:
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)


def traced(log: Path, *command: str) -> list[str]:
    """The command under strace, its trace written to `log`; the command as it is when strace cannot trace."""
    return list(command) if unusable() else ["strace", "-f", "--seccomp-bpf", "-e", CALLS, "-o", str(log), *command]


@cache
def offline() -> list[str]:
    """A prefix that runs a command in a network namespace of its own, where unshare can make one: a connection
    it tries is still traced, but fails there, so nothing leaves."""
    for prefix in (["unshare", "--net"], ["unshare", "--net", "--map-root-user"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return []


def outgoing(log: Path) -> list[str]:
    """The lines of a trace that reach beyond this machine, or would through a local resolver."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        for port, address in INET_ADDRESS.findall(line):
            ip = ipaddress.ip_address(address.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is IPv4's loopback
            if port == DNS_PORT or not ip.is_loopback:
                found.append(line)
                break
        else:
            if RESOLVER_SOCKET in line:
                found.append(line)
    return found


def processes(log: Path) -> int:
    """How many processes the trace followed to their end: proof that -f followed the command's children."""
    return sum(" +++ exited with " in line or " +++ killed by " in line for line in log.read_text().splitlines())
