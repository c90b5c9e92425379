"""The installed daemon commands (``zstore-chunk``, ``zstore-meta``, ...).

They go through here rather than straight to ``chunk.server:main`` because
Python 3.11 and 3.12 still ship a standard-library module named ``chunk``
(deprecated, removed in 3.13), and the standard library comes before
site-packages, and before an editable install's finder, on ``sys.path``: an
installed ``zstore-chunk`` imported the stdlib's ``chunk.py`` and failed with
"'chunk' is not a package". ``python -m chunk.server`` from the source tree
worked (the working directory comes first), which is how ``zstore up`` and
the tests had run it.

``prefer_our_chunk`` puts a finder first on ``sys.meta_path`` that answers
for the top-level name ``chunk`` only, with the package installed beside
``zstore``; every other import resolves as before (no ``sys.path`` reordering,
which would let site-packages shadow the whole standard library).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

#: our top-level package whose name the standard library also uses (3.11, 3.12)
SHADOWED = "chunk"


class _OwnPackageFinder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, directory: Path) -> None:
        self.name, self.directory = name, directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None             # submodules come through the package's __path__
        return importlib.util.spec_from_file_location(
            fullname, self.directory / "__init__.py",
            submodule_search_locations=[str(self.directory)])


def prefer_our_chunk() -> None:
    """Make ``import chunk`` load zstore's chunk-server package. Idempotent."""
    if any(isinstance(f, _OwnPackageFinder) for f in sys.meta_path):
        return
    directory = Path(__file__).resolve().parent.parent / SHADOWED
    if not (directory / "__init__.py").is_file():
        raise ImportError(f"zstore's {SHADOWED!r} package is not installed beside "
                          f"{Path(__file__).resolve().parent}")
    loaded = sys.modules.get(SHADOWED)
    if loaded is not None and not hasattr(loaded, "__path__"):
        del sys.modules[SHADOWED]   # the stdlib module, imported by someone before us
    sys.meta_path.insert(0, _OwnPackageFinder(SHADOWED, directory))


def chunk_server() -> int:
    prefer_our_chunk()
    from chunk.server import main
    return main()


def meta_server() -> int:
    prefer_our_chunk()
    from meta.server import main
    return main()


def redirector_server() -> int:
    prefer_our_chunk()
    from redirector.server import main
    return main()


def csi_server() -> int | None:
    prefer_our_chunk()
    from csi.server import main
    return main()
