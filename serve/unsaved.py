"""Generated adapters that were not saved, kept on disk where every Gateway replica finds them.

An unsaved adapter made through one Gateway replica must work through the others (and through a replica that
Serve restarted after a crash), so it cannot live in one replica's memory. It lives beside the library, on the
same file system the library already requires every node to share:

    <library>/unsaved/<tmp-id>/   adapter_config.json, adapter_model.safetensors (safetensors only, never a
                                  pickle), hyperlora.json when it has metadata, info.json (its AdapterInfo)
    <library>/unsaved/.staging/   in-flight writes

A write goes to .staging/ and is renamed into place in one step, so a reader sees a whole adapter or none. The
store is bounded by bytes: the least recently used adapters (the mtime of info.json, touched on use) are dropped
first, by whichever replica writes next. Each replica also keeps the adapters it used last in memory, with the
object-store reference the LLM requests carry, so a hot adapter is read from disk once per replica.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from generator.peft_format import AdapterFormatError
from retriever.fsutil import dir_lock
from serve.schemas import AdapterInfo

if TYPE_CHECKING:
    from generator.lora import LoraAdapter  # torch; only the Generator's adapters bring it

logger = logging.getLogger(__name__)
EPHEMERAL_PREFIX = "tmp-"
INFO_NAME = "info.json"
_ID = re.compile(r"tmp-[0-9a-f]{32}")
STALE_S = 3600.0  # a staging entry this old was left by a crashed writer
MEMORY_ITEMS = 64  # adapters each replica keeps loaded (and shared with the LLM replicas)


def is_unsaved_id(adapter_id: str) -> bool:
    """Whether `adapter_id` is the id of an unsaved adapter (checked before it becomes a path)."""
    return bool(_ID.fullmatch(adapter_id))


@dataclass
class Unsaved:
    info: AdapterInfo
    adapter: LoraAdapter  # on the CPU
    share: Callable[[LoraAdapter], Any] | None  # makes what LLM requests carry (a Ray object reference)
    _ref: Any = None

    @property
    def ref(self) -> Any:
        """What LLM requests carry: put in the object store on first use, not on the generate path."""
        if self._ref is None:
            self._ref = self.share(self.adapter) if self.share is not None else self.adapter
        return self._ref


class UnsavedStore:
    """Unsaved adapters under `root`, shared by every process that opens the same directory."""

    def __init__(self, root: str | Path, max_bytes: int, memory_items: int = MEMORY_ITEMS) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.root = Path(root).expanduser()
        self.max_bytes, self.memory_items = max_bytes, memory_items
        self._staging = self.root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        _clear_stale(self._staging, STALE_S)
        self._memory: OrderedDict[str, Unsaved] = OrderedDict()
        self._mutex = threading.Lock()

    def put(self, adapter: LoraAdapter, info: AdapterInfo, share: Callable[[LoraAdapter], Any] | None) -> None:
        """Write `adapter` under `info.id` (atomically), dropping the least recently used ones beyond the bound."""
        if not is_unsaved_id(info.id):
            raise ValueError(f"{info.id!r} is not an unsaved adapter id ({EPHEMERAL_PREFIX}<32 hex digits>)")
        from generator.peft_io import save_peft  # torch (the adapter came with it); not at the Gateway's start

        tmp = Path(tempfile.mkdtemp(prefix=f"{info.id}.", dir=self._staging))
        try:
            save_peft(adapter, tmp)
            (tmp / INFO_NAME).write_text(info.model_dump_json())
            os.chmod(tmp, 0o755)
            with dir_lock(self.root):
                self._evict(_dir_bytes(tmp))
                os.replace(tmp, self.root / info.id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._remember(Unsaved(info, adapter, share))

    def get(self, adapter_id: str, share: Callable[[LoraAdapter], Any] | None = None) -> Unsaved | None:
        """The adapter and its info, or None when no replica has it (never made, deleted, or dropped)."""
        if not is_unsaved_id(adapter_id):
            return None
        d = self.root / adapter_id
        with self._mutex:
            item = self._memory.get(adapter_id)
            if item is not None:
                self._memory.move_to_end(adapter_id)
        if not (d / INFO_NAME).exists():  # deleted or dropped through another replica
            self._forget(adapter_id)
            return None
        _touch(d / INFO_NAME)
        if item is not None:
            return item
        from generator.peft_io import load_peft  # torch: not at the Gateway's start

        try:
            info = AdapterInfo.model_validate_json((d / INFO_NAME).read_text())
            adapter = load_peft(d)
        except (OSError, ValueError, AdapterFormatError) as e:  # removed while reading, or damaged
            logger.warning("unsaved adapter %s cannot be read: %s", adapter_id, e)
            return None
        item = Unsaved(info, adapter, share)
        self._remember(item)
        return item

    def remove(self, adapter_id: str) -> bool:
        self._forget(adapter_id)
        if not is_unsaved_id(adapter_id):
            return False
        with dir_lock(self.root):
            return _delete(self.root / adapter_id)

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if is_unsaved_id(p.name))

    @property
    def nbytes(self) -> int:
        return sum(_dir_bytes(self.root / i) for i in self.ids())

    def _remember(self, item: Unsaved) -> None:
        with self._mutex:
            self._memory[item.info.id] = item
            self._memory.move_to_end(item.info.id)
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)

    def _forget(self, adapter_id: str) -> None:
        with self._mutex:
            self._memory.pop(adapter_id, None)

    def _evict(self, incoming: int) -> None:
        """Under the lock: drop least recently used adapters until `incoming` more bytes fit."""
        entries = []
        for i in self.ids():
            try:
                entries.append(((self.root / i / INFO_NAME).stat().st_mtime, i, _dir_bytes(self.root / i)))
            except OSError:  # half-removed
                continue
        total = sum(size for _, _, size in entries)
        for _, old_id, size in sorted(entries):
            if total + incoming <= self.max_bytes:
                break
            _delete(self.root / old_id)
            self._forget(old_id)
            total -= size
            logger.info("dropped unsaved adapter %s (least recently used; the store keeps %d bytes)", old_id,
                        self.max_bytes)


def _clear_stale(staging: Path, age_s: float) -> None:
    """Writes a crash interrupted (other replicas may be writing now: only old entries go)."""
    now = time.time()
    for entry in staging.iterdir():
        try:
            if now - entry.stat().st_mtime > age_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _dir_bytes(d: Path) -> int:
    try:
        return sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    except OSError:
        return 0


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _delete(d: Path) -> bool:
    """Rename out of sight first (readers then see it gone at once), then delete."""
    if not d.is_dir():
        return False
    gone = d.parent / ".staging" / f"{d.name}.deleted"
    try:
        os.replace(d, gone)
    except OSError:
        return False
    shutil.rmtree(gone, ignore_errors=True)
    return True
