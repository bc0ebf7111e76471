"""The contract's NATS definitions, shipped inside the package (read with importlib.resources).

`registry/nats/` holds the stream, bucket and consumer definitions in the form
`nats stream add --config FILE` takes, and the server configuration. The
repository's top-level `nats/` is a symbolic link to that folder, so the `nats`
CLI and the registry read one copy, whether the registry runs from a checkout
or from an installed wheel.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final

ROOT: Final[Traversable] = files("registry") / "nats"
SERVER_CONF: Final = "server.conf"


def load(relpath: str) -> dict[str, Any]:
    """One JSON definition, e.g. `streams/WORKER_EVENTS.json`."""
    definition: dict[str, Any] = json.loads(ROOT.joinpath(*relpath.split("/")).read_text())
    return definition


@contextlib.contextmanager
def path_of(relpath: str) -> Iterator[Path]:
    """A file system path for a definition, for programs that take one (nats-server -c)."""
    with as_file(ROOT.joinpath(*relpath.split("/"))) as path:
        yield path


def listing() -> list[str]:
    """Every definition file, as paths relative to the folder (sorted)."""
    found: list[str] = []

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif not child.name.startswith("."):
                found.append(prefix + child.name)

    walk(ROOT, "")
    return sorted(found)
