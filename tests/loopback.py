"""A guard for tests that start local services (a Dask cluster, XGBoost's tracker, LightGBM's
network, torch.distributed): every socket a Python process of the test opens to an address
(connect, sendto) is recorded through an audit hook, and the tests assert that each went to
the loopback interface. This catches the classic leak -- a library guessing the host's own
address by "connecting" a UDP socket to an outside one (distributed.utils.get_ip does that
with 8.8.8.8 when no host is given). Connections made by C code below Python (XGBoost's
tracker, gloo) raise no audit event: those are bound to 127.0.0.1 by the tests' settings.

    install()        # in this process and, through client.run(install), in each worker
    outside()        # the non-loopback addresses seen so far, as "event host:port" strings
"""

from __future__ import annotations

import ipaddress
import socket
import sys

_SEEN: list = []
_INSTALLED = False


def _loopback(host) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost: a lookup of the outside world


def _hook(event, args):
    if event in ("socket.connect", "socket.sendto"):
        sock, address = args[0], args[-1]
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6) and \
                isinstance(address, tuple) and not _loopback(address[0]):
            _SEEN.append(f"{event} {address[0]}:{address[1]}")


def install() -> int:
    """Start recording in this process (once); returns the process id."""
    global _INSTALLED
    if not _INSTALLED:
        sys.addaudithook(_hook)
        _INSTALLED = True
    import os

    return os.getpid()


def outside() -> list:
    """The non-loopback addresses this process opened sockets to since install()."""
    return list(_SEEN)
