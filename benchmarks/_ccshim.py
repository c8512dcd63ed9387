"""Give a baseline's TCP sockets a chosen congestion control, so that it and
peerd (whose data sockets ask for one themselves: ``NodeConfig.data_congestion``)
are compared on equal terms: a tiny ``LD_PRELOAD`` library sets
``TCP_CONGESTION`` on every TCP socket the program opens (gloo offers no knob).

On this project's 2-core VMs the host's default is BBR, which cost gloo ~15%
at 100M against CUBIC; a baseline left on it would flatter peerd.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from peerd.datasock import SYSTEM_CONGESTION as SYSTEM
from peerd.datasock import host_congestion

_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (!real) real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    int fd = real(domain, type, protocol);
    const char *cc = getenv("PEERD_BENCH_TCP_CONGESTION");
    if (fd >= 0 && cc && (domain == AF_INET || domain == AF_INET6)
        && (type & 0xf) == SOCK_STREAM)
        setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cc, strlen(cc));
    return fd;
}
"""


def effective(name: str) -> str:
    """What ``name`` (``SYSTEM``: the host's) runs as."""
    return host_congestion() if name == SYSTEM else name


def preload_env(name: str) -> dict[str, str]:
    """Environment that makes a child process's TCP sockets run ``name``;
    empty for the host's default, or where no C compiler builds the library
    (the caller then reports what the child ran: ``running_congestion``)."""
    if effective(name) == host_congestion():
        return {}
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return {}
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    lib = Path(tempfile.gettempdir()) / f"peerd-bench-ccshim-{digest}.so"
    if not lib.exists():
        src = lib.with_suffix(".c")
        src.write_text(_SOURCE)
        tmp = lib.with_suffix(".tmp")
        done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src),
                               "-ldl"], capture_output=True)
        if done.returncode != 0:
            return {}
        tmp.replace(lib)  # atomic: a concurrent run never loads half a file
    return {"LD_PRELOAD": str(lib), "PEERD_BENCH_TCP_CONGESTION": name}
