"""Close this process's listening sockets on a port at once, before gRPC's stop.

A worker's gRPC listeners share the port with its siblings' (SO_REUSEPORT), and gRPC's
stop closes them one server at a time, each sending GOAWAY to its own connections as
it goes. A client told to go reconnected at once, and the kernel could hash the new
connection onto one of the same worker's listeners not yet closed; that listener's
close then reset it, still queued (Linux resets what a closed listener had not
accepted, unless ``net.ipv4.tcp_migrate_req`` is 1). The client's channel saw
"Connection reset by peer", backed off ~1 s and failed every call meanwhile (1,567
calls of six threads in one CI run of a rolling restart). Closed together first, the
listeners leave the port's group before any GOAWAY is sent: reconnects go to the
listeners that stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)

FD_DIR = "/proc/self/fd"


def stop_listening(port: int) -> int:
    """Close every listening TCP socket of this process bound to ``port``, each by
    putting an unbound socket in its place (``dup2``); returns how many. Nothing where
    ``/proc`` is not Linux's.

    Closed, a listener leaves the port's SO_REUSEPORT group at once, so new connections
    go to the group's other sockets. Its owner (gRPC's core) keeps the same descriptor
    number and closes the stand-in when it stops, as it would have closed the listener.
    Shutting the listener down in place (``shutdown()``) would leave the same group, but
    wakes the core's poller on it: its accept fails and it logged "Closing acceptor.
    Failed accept4: Invalid argument" (ERROR), ~60 lines a worker. A closed file's
    poller registration goes with it, silently."""
    stopped = 0
    for fd in _socket_fds():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # closed meanwhile, or not an inet socket
            continue
        with sock:
            try:
                if not _listens_on(sock, port):
                    continue
                with socket.socket(sock.family, socket.SOCK_STREAM) as stand_in:
                    stand_in.setblocking(False)
                    # The dup held here keeps the listener open until this block ends.
                    os.dup2(stand_in.fileno(), fd)
                stopped += 1
            except OSError as exc:
                log.debug("could not close listening socket %d: %s", fd, exc)
    return stopped


def _listens_on(sock: socket.socket, port: int) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return False
    return bool(sock.getsockname()[1] == port)


def _socket_fds() -> list[int]:
    fds: list[int] = []
    with contextlib.suppress(OSError):
        for name in os.listdir(FD_DIR):
            with contextlib.suppress(OSError, ValueError):
                if os.readlink(f"{FD_DIR}/{name}").startswith("socket:"):
                    fds.append(int(name))
    return fds
