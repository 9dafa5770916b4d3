"""Run a command on a pseudo-terminal, as a user's shell would (rich draws tables only there)."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Mapping, Sequence


def run_on_terminal(argv: Sequence[str], env: Mapping[str, str], timeout: float = 60) -> tuple[int, str]:
    """Exit status and everything the command wrote to its terminal (decoded leniently)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(list(argv), env=dict(env), stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=timeout)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return rc, b"".join(chunks).decode("utf-8", "replace")
