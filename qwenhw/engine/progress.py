"""Read a checkpoint's weight files once with a progress bar (bytes, speed, ETA).

Engines memory-map safetensors; reading the files first moves the slow part (disk to page cache) under a
visible progress bar instead of a silent stall inside the first forward pass.
"""

from __future__ import annotations

import glob
import os
import sys

from .. import settings

CHUNK = 16 * 2**20


def prefetch(path: str, quiet: bool | None = None) -> int:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    total = sum(os.path.getsize(f) for f in files)
    import psutil

    if total > psutil.virtual_memory().available / 2:
        return 0  # would only evict itself from the page cache: let the engine stream from disk
    if quiet is None:
        quiet = not sys.stderr.isatty() or settings.get("QWENHW_QUIET")
    if quiet:
        for f in files:
            _read(f, None)
        return total
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("reading weights"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("weights", total=total)
        for f in files:
            _read(f, lambda n: bar.advance(task, n))
    return total


def _read(file: str, advance) -> None:
    with open(file, "rb", buffering=0) as fh:
        while True:
            block = fh.read(CHUNK)
            if not block:
                return
            if advance:
                advance(len(block))
