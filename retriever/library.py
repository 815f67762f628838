"""The adapter library on disk: one PEFT directory plus `metadata.json` per adapter.

Layout under `root`:
    library.json              format and (when known) the base model's spec
    version.json              a counter bumped on every mutation, by any process
    adapters/<id>/            adapter_config.json, adapter_model.safetensors, metadata.json
    staging/ trash/           in-flight adds and removals (emptied on open)
    quarantine/               directories found malformed on open, kept for inspection
    index/                    the router's FAISS index cache (see index_store.py)

Every add is written into staging/, fsynced, then renamed into adapters/ in one step, so a crash at any
point leaves either no trace in adapters/ or a complete adapter. Mutations hold an exclusive lock on the
root directory, so several processes (service replicas, the CLI) may share a library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from generator.models import hyperlora_home
from generator.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError
from generator.spec import ModelSpec
from retriever.fsutil import clear_dir, dir_lock, fsync_dir, fsync_tree, write_json_atomic, write_json_durable
from retriever.records import (
    METADATA_NAME,
    AdapterNotFound,
    AdapterRecord,
    InvalidAdapterId,
    check_fields,
    check_id,
    check_instruction,
    check_strength,
    new_id,
    now_iso,
)

if TYPE_CHECKING:
    from generator.lora import LoraAdapter  # torch: imported where weights are read or written

__all__ = ["AdapterLibrary", "AdapterNotFound", "AdapterRecord", "InvalidAdapterId", "default_library_root"]
logger = logging.getLogger(__name__)
LIBRARY_FORMAT = 1


def default_library_root() -> Path:
    """`$HYPERLORA_HOME/library`: where the CLI and the service keep the library unless told otherwise."""
    return hyperlora_home() / "library"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _publish(src: Path, dst: Path) -> None:
    """The commit point of an add: one rename of a complete, fsynced directory."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def _make_readable(d: Path) -> None:
    """Temp dirs are created 0700: let other users of a shared library (e.g. service replicas) read it."""
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)


class AdapterLibrary:
    """A directory of adapters with their metadata; safe to share between processes."""

    def __init__(self, root: str | Path, spec: ModelSpec | None = None) -> None:
        self.root = Path(root).expanduser()
        self.adapters_dir = self.root / "adapters"
        self.index_dir = self.root / "index"
        self._staging, self._trash, self._quarantine = (self.root / n for n in ("staging", "trash", "quarantine"))
        for d in (self.root, self.adapters_dir, self.index_dir, self._staging, self._trash, self._quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._mutex = threading.RLock()
        self._records: dict[str, AdapterRecord] = {}
        self._records_version: str | None = None
        with dir_lock(self.root):
            self.spec = self._open_spec(spec)
            self._recover()

    # -- opening
    def _open_spec(self, spec: ModelSpec | None) -> ModelSpec | None:
        meta_path = self.root / "library.json"
        if not meta_path.exists():
            write_json_atomic(meta_path, {"format": LIBRARY_FORMAT, "spec": spec.to_dict() if spec else None})
            return spec
        try:
            meta = json.loads(meta_path.read_text())
            stored = ModelSpec.from_dict(meta["spec"]) if meta.get("spec") else None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{meta_path} is not a valid library description: {e}") from e
        if stored is None:
            if spec is not None:
                write_json_atomic(meta_path, {"format": LIBRARY_FORMAT, "spec": spec.to_dict()})
            return spec
        if spec is not None:
            why = spec.mismatch(stored, list(stored.shapes))
            if why:
                raise ValueError(f"library {self.root} holds adapters for {stored.name}, not {spec.name}: {why}")
        return spec or stored

    def _recover(self) -> None:
        """Finish what a crash interrupted: drop half-written adds and removals, quarantine malformed dirs."""
        leftovers = clear_dir(self._staging) + clear_dir(self._trash)
        if leftovers:
            logger.warning("library %s: discarded %d interrupted write(s): %s", self.root, len(leftovers), leftovers)
        changed = False
        for entry in sorted(self.adapters_dir.iterdir()):
            problem = self._check_entry(entry)
            if problem:
                dst = self._quarantine / f"{entry.name}-{int(time.time())}"
                os.replace(entry, dst)
                logger.warning("library %s: moved malformed entry %s to quarantine/ (%s)", self.root, entry.name,
                               problem)
                changed = True
        if changed:
            fsync_dir(self.adapters_dir)
            self._bump_version()

    def _check_entry(self, entry: Path) -> str | None:
        if not entry.is_dir() or entry.is_symlink():
            return "not a directory"
        try:
            check_id(entry.name)
        except InvalidAdapterId as e:
            return str(e)
        for name in (CONFIG_NAME, WEIGHTS_NAME, METADATA_NAME):
            if not (entry / name).is_file():
                return f"{name} is missing"
        try:
            record = AdapterRecord.from_dict(json.loads((entry / METADATA_NAME).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            return f"{METADATA_NAME} is invalid: {e}"
        if record.id != entry.name:
            return f"{METADATA_NAME} names id {record.id!r}"
        return None

    # -- version
    @property
    def version(self) -> str:
        """Changes on every add/remove, whichever process made it: `<counter>:<adapters/ mtime ns>`."""
        return f"{self._read_counter()}:{self.adapters_dir.stat().st_mtime_ns}"

    def _read_counter(self) -> int:
        try:
            return int(json.loads((self.root / "version.json").read_text())["version"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return 0

    def _bump_version(self) -> None:
        write_json_atomic(self.root / "version.json", {"version": self._read_counter() + 1})

    # -- reading
    def _sync(self) -> dict[str, AdapterRecord]:
        """The records, re-read from disk only when the version changed (metadata never changes after add)."""
        with self._mutex:
            version = self.version
            if version != self._records_version:
                present = {p.name for p in self.adapters_dir.iterdir()}
                records = {i: r for i, r in self._records.items() if i in present}
                for i in present - set(records):
                    try:
                        meta = (self.adapters_dir / i / METADATA_NAME).read_text()
                        records[i] = AdapterRecord.from_dict(json.loads(meta))
                    except (OSError, json.JSONDecodeError, ValueError) as e:
                        logger.warning("library %s: skipping unreadable adapter %s (%s)", self.root, i, e)
                self._records, self._records_version = records, version
            return self._records

    def list(self) -> list[AdapterRecord]:
        """Every adapter's record, oldest first."""
        return sorted(self._sync().values(), key=lambda r: (r.created, r.id))

    def __len__(self) -> int:
        return len(self._sync())

    def __contains__(self, adapter_id: object) -> bool:
        return isinstance(adapter_id, str) and adapter_id in self._sync()

    def get(self, id: str) -> AdapterRecord:
        check_id(id)
        record = self._sync().get(id)
        if record is None:
            raise AdapterNotFound(id)
        return record

    def find(self, name: str) -> list[AdapterRecord]:
        """Records whose name is `name`, oldest first."""
        return [r for r in self.list() if r.name == name]

    def path(self, id: str) -> Path:
        """The adapter's PEFT directory (for building archives; never show it to clients)."""
        self.get(id)
        return self.adapters_dir / id

    def load(self, id: str) -> LoraAdapter:
        """Read the adapter's weights, checking them against the recorded sha256 and the library's base model."""
        record = self.get(id)
        t0 = time.perf_counter()
        d = self.adapters_dir / id
        digest = sha256_file(d / WEIGHTS_NAME)
        if digest != record.sha256:
            raise AdapterFormatError(f"adapter {id}: {WEIGHTS_NAME} does not match its recorded sha256 "
                                     f"(file changed or corrupted on disk)")
        from generator.peft_io import load_peft  # torch: only where weights are read (not to list or delete)

        adapter = load_peft(d, self.spec)
        adapter.metadata.update({"id": id, "name": record.name})
        logger.info("loaded adapter %s (%s) in %.1f ms", id, record.name, 1e3 * (time.perf_counter() - t0))
        return adapter

    # -- writing
    def add(self, adapter: LoraAdapter, name: str, descriptions: Sequence[str], source: str,
            sample_inputs: Sequence[str] = (), adapter_id: str | None = None) -> AdapterRecord:
        """Store `adapter` under a new id, atomically; raise ValueError naming what was wrong. Its instruction is
        `adapter.metadata["instruction"]` (kept in its hyperlora.json and in the record).

        With `adapter_id` (e.g. derived from a request's idempotency key), an adapter already stored under that id is
        returned as it is: a request sent again after its first attempt stored it stores nothing new."""
        from generator.peft_io import save_peft

        name, descriptions, source, sample_inputs = check_fields(name, descriptions, source, sample_inputs)
        instruction = check_instruction(adapter.metadata.get("instruction"))
        strength = check_strength(adapter.metadata.get("strength_with_examples"))
        adapter.check_finite()
        if self.spec is not None:
            adapter.check_fits(self.spec)
        t0 = time.perf_counter()
        adapter_id = check_id(adapter_id) if adapter_id is not None else new_id()
        stage = self._staging / adapter_id
        with self._mutex, dir_lock(self.root):
            if (self.adapters_dir / adapter_id).is_dir():
                logger.info("adapter %s is stored already (the same request sent again)", adapter_id)
                return self.get(adapter_id)
            try:
                save_peft(adapter, stage)
                record = AdapterRecord(
                    id=adapter_id, name=name, descriptions=descriptions, source=source,  # type: ignore[arg-type]
                    base_model=self.spec.name if self.spec else adapter.base_model, rank=adapter.rank,
                    target_modules=list(adapter.target_modules), created=now_iso(),
                    sha256=sha256_file(stage / WEIGHTS_NAME), sample_inputs=sample_inputs, instruction=instruction,
                    strength_with_examples=strength,
                )
                write_json_durable(stage / METADATA_NAME, record.to_file())
                _make_readable(stage)
                fsync_tree(stage)
                _publish(stage, self.adapters_dir / adapter_id)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            self._bump_version()
        logger.info("added adapter %s (%s, %s) in %.1f ms", adapter_id, name, source, 1e3 * (time.perf_counter() - t0))
        return record

    def add_peft_dir(self, path: str | Path, name: str, descriptions: Sequence[str], source: str = "uploaded",
                     sample_inputs: Sequence[str] = (), adapter_id: str | None = None) -> AdapterRecord:
        """Validate a PEFT LoRA directory (no pickle, finite, fits the base model) and add a canonical copy."""
        from generator.peft_io import load_peft

        try:
            adapter = load_peft(path, self.spec)
        except AdapterFormatError:
            raise
        except ValueError as e:  # shape mismatch against the library's base model
            raise ValueError(f"adapter does not fit this library's base model: {e}") from e
        return self.add(adapter, name, descriptions, source, sample_inputs, adapter_id)

    def remove(self, id: str) -> None:
        """Delete an adapter atomically (one rename out of adapters/, then cleanup)."""
        check_id(id)
        with self._mutex, dir_lock(self.root):
            src = self.adapters_dir / id
            if not src.is_dir():
                raise AdapterNotFound(id)
            dst = self._trash / f"{id}-{new_id()[:8]}"
            os.replace(src, dst)
            fsync_dir(self.adapters_dir)
            self._bump_version()
            shutil.rmtree(dst, ignore_errors=True)
        logger.info("removed adapter %s", id)

    def __repr__(self) -> str:
        return f"AdapterLibrary({str(self.root)!r}, {len(self)} adapters)"
