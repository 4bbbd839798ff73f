"""Where toy teachers are cached, and one trainer per cached file.

Toy teachers are trained once and cached per machine. Two processes that miss the cache at the same moment (the test
suite's parallel workers, the demo started beside the tests) would each train the same file: the writes are atomic,
so nothing breaks, but the second run doubles the minutes. Holding `training_lock` while checking the cache and
training makes the second process wait and then reuse the first one's file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; a race then only costs duplicate training
    fcntl = None


@contextmanager
def training_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `<path>.lock` (created beside the cached file, never deleted: removing it while
    another process waits on it would let a third one lock a new file)."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_dir() -> Path:
    """Where trained toy teachers (and the metric classifier) are cached: $TDM_TOY_CACHE or ~/.cache/comfyui-tdm."""
    env = os.environ.get("TDM_TOY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "comfyui-tdm"
