"""Finds the bundled kdgraph binary and runs it, turning its failures into KdgraphError."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

EXE = "kdgraph.exe" if os.name == "nt" else "kdgraph"


class KdgraphError(Exception):
    """The kdgraph binary failed.

    Attributes:
        message: its one-line error, without the ``error: `` prefix.
        exit_code: 1 for a model or file it cannot use, 2 for a bad request (usage).
        stderr: everything it wrote to standard error.
    """

    def __init__(self, message: str, exit_code: int, stderr: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.stderr = stderr

    def __str__(self) -> str:
        return f"{self.message} (exit {self.exit_code})"


def _recorded() -> Iterator[Path]:
    """The binary that the installed distribution's RECORD lists (pip put it in its scripts folder)."""
    try:
        files = metadata.distribution("kdgraph").files or []
    except metadata.PackageNotFoundError:
        return
    for file in files:
        if file.name == EXE:
            yield Path(os.path.normpath(file.locate()))


def _candidates() -> Iterator[Path]:
    """Where an install puts the binary, most specific first."""
    yield from _recorded()
    yield Path(sys.executable).parent / EXE
    for scheme in (None, f"{os.name}_user"):
        try:
            scripts = sysconfig.get_path("scripts", scheme) if scheme else sysconfig.get_path("scripts")
        except KeyError:
            continue
        yield Path(scripts) / EXE
    found = shutil.which("kdgraph")
    if found:
        yield Path(found)


def find_binary() -> Path:
    """The kdgraph binary: ``$KDGRAPH_BIN`` when set (and then only it), else the one this package
    was installed with (its scripts folder, beside the Python executable), else ``kdgraph`` on PATH.

    Raises:
        FileNotFoundError: none was found, or ``$KDGRAPH_BIN`` is not a file.
    """
    given = os.environ.get("KDGRAPH_BIN")
    if given:
        if Path(given).is_file():
            return Path(given)
        raise FileNotFoundError(f"KDGRAPH_BIN={given} is not a file; point it at the kdgraph binary")
    for path in _candidates():
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "the kdgraph binary was not found beside this Python nor on PATH: install the package "
        "(pip install kdgraph, or pip install . in a clone) or set KDGRAPH_BIN"
    )


def error_line(stderr: str) -> str:
    """The binary's one-line error: its first line starting ``error: ``, without the prefix (else
    the last non-empty line, else a placeholder)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error: "):
            return line[len("error: "):]
    return lines[-1] if lines else "kdgraph failed without a message"


def run(args: Sequence[str]) -> str:
    """Runs ``kdgraph ARGS`` and returns its standard output.

    Raises:
        KdgraphError: it exited with a non-zero code.
    """
    command = [str(find_binary()), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise KdgraphError(error_line(done.stderr), done.returncode, done.stderr)
    return done.stdout
