"""Writing a directory atomically: build it beside its final place, fsync, then swap it in.

A crash at any point leaves either the previous directory or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds it replaces `out` (files 0644, dir 0755)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(0o644)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        tmp.chmod(0o755)  # mkdtemp makes it private; what we write is meant to be shared
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
