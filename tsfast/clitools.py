"""What the command-line tools (train.py, sample.py, demo.py, prepare) do alike.

Exits that are not errors of the tool stay quiet and use the shell's codes, 128 + signal:

    130  Ctrl-C (SIGINT), at any moment, start-up included: one line, no traceback
    141  the reader of stdout went away (`sample.py | head -c 50`): SIGPIPE's code, nothing
         printed, and no "Exception ignored ... BrokenPipeError" from Python's last flush

`check_bind` tells the demo, before Gradio starts, whether it can serve on --host/--port.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import socket
import sys

EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def silence_stdout() -> None:
    """Send the rest of stdout to /dev/null (its reader is gone)."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # not backed by a file descriptor
        sys.stdout = open(os.devnull, "w")  # lives until exit, like stdout itself


def quiet_exits(main):
    """Wrap a CLI main(): Ctrl-C returns 130 after one line, a closed stdout returns 141."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            try:
                print("\ninterrupted", file=sys.stderr, flush=True)
            except OSError:
                pass
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            silence_stdout()
            return EXIT_BROKEN_PIPE

    return wrapper


def check_bind(host: str, port: int) -> tuple[int, str] | None:
    """None if a server can listen on (host, port) now, else (exit code, message): 2 for a
    host that is not an address of this machine, 1 for a port that is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        return 2, (f"--host {host!r} is not an IP address or a name this machine can resolve ({e}); "
                   "use 127.0.0.1 (this machine only) or 0.0.0.0 (every network interface)")
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return 2, (f"--host {host} is not an address of this machine; use 127.0.0.1 (this "
                           "machine only) or 0.0.0.0 (every network interface)")
            why = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror
            return 1, f"cannot serve on {host}:{port} ({why}); pick another with --port"
    return None
