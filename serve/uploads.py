"""Uploaded adapters in, downloadable archives out, without unpickling or trusting a path.

An upload is a .zip / .tar / .tar.gz of a PEFT directory, or its files sent one by one. Only regular
files are read; names are reduced to their last component after refusing absolute paths, `..`, links
and devices; sizes are capped while reading (an archive's own size fields are not trusted); pickle
files are refused outright; only `adapter_config.json` and `adapter_model.safetensors` are kept.
The weights are then parsed by `generator.peft_io.load_peft`, which reads safetensors and JSON only.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

from generator.peft_format import CONFIG_NAME, PICKLE_SUFFIXES, SIDECAR_NAME, WEIGHTS_NAME
from serve.errors import InvalidAdapter, TooLarge

REQUIRED = (CONFIG_NAME, WEIGHTS_NAME)
KEPT = (*REQUIRED, SIDECAR_NAME)  # the sidecar (optional) carries the adapter's instruction
IGNORED = ("README.md", "metadata.json", "training_args.json")


def _safe_name(name: str) -> str:
    """The file name of an archive member, refusing anything that could point outside the upload."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise InvalidAdapter(f"refusing archive member {name[:120]!r}: absolute or malformed path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidAdapter(f"refusing archive member {name[:120]!r}: path traversal ('..')")
    return parts[-1] if parts else ""


class _Collector:
    """Gathers the kept files of one upload within the size and count limits."""

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.files: dict[str, bytes] = {}
        self.total = 0
        self.seen = 0

    def accept(self, name: str, declared: int | None) -> str | None:
        """The base name to keep `name` under, None to skip it; raises on pickles, limits and duplicates."""
        self.seen += 1
        if self.seen > self.max_files:
            raise TooLarge(f"the upload holds more than {self.max_files} files", param="file", limit=self.max_files)
        base = _safe_name(name)
        if not base or base.startswith(".") or base in IGNORED or posixpath.basename(name).startswith("._"):
            return None
        if base.endswith(PICKLE_SUFFIXES):
            raise InvalidAdapter(f"refusing pickle-based file {base!r}: upload adapter_model.safetensors instead")
        if base not in KEPT:
            raise InvalidAdapter(f"unexpected file {base!r} in the upload: a PEFT LoRA adapter is "
                                 f"{CONFIG_NAME} plus {WEIGHTS_NAME} (and optionally {SIDECAR_NAME})")
        if base in self.files:
            raise InvalidAdapter(f"the upload holds {base} twice: send one adapter per upload")
        if declared is not None and self.total + declared > self.max_bytes:
            raise TooLarge(f"the upload unpacks to more than {self.max_bytes} bytes", param="file",
                           limit=self.max_bytes)
        return base

    def add(self, base: str, stream: io.BufferedIOBase | io.BytesIO) -> None:
        budget = self.max_bytes - self.total
        data = stream.read(budget + 1)
        if len(data) > budget:
            raise TooLarge(f"the upload unpacks to more than {self.max_bytes} bytes", param="file",
                           limit=self.max_bytes)
        self.total += len(data)
        self.files[base] = data

    def write(self, dest: Path) -> Path:
        missing = [n for n in REQUIRED if n not in self.files]
        if missing:
            raise InvalidAdapter(f"the upload lacks {' and '.join(missing)}: send a PEFT LoRA adapter directory")
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (dest / name).write_bytes(data)
        return dest


def extract_archive(data: bytes, dest: Path, max_bytes: int, max_files: int) -> Path:
    """Unpack a .zip, .tar or .tar.gz held in `data` into `dest` (flat: the two PEFT files)."""
    col = _Collector(max_bytes, max_files)
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        _from_zip(data, col)
    else:
        _from_tar(data, col)
    return col.write(dest)


def _from_zip(data: bytes, col: _Collector) -> None:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise InvalidAdapter(f"the upload is not a readable zip archive: {e}") from e
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            mode = info.external_attr >> 16
            if mode and (mode & 0o170000) not in (0, 0o100000):
                raise InvalidAdapter(f"refusing archive member {info.filename[:120]!r}: not a regular file")
            base = col.accept(info.filename, info.file_size)
            if base is not None:
                try:
                    with zf.open(info) as fh:
                        col.add(base, fh)
                except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as e:
                    raise InvalidAdapter(f"cannot read {info.filename[:120]!r} from the zip archive: {e}") from e


def _from_tar(data: bytes, col: _Collector) -> None:
    try:
        tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InvalidAdapter("the upload is neither a zip nor a (gzipped) tar archive") from e
    with tf:
        try:
            for member in tf:
                if member.isdir():
                    continue
                if not member.isreg():
                    raise InvalidAdapter(f"refusing archive member {member.name[:120]!r}: links and devices "
                                         f"are not allowed")
                base = col.accept(member.name, member.size)
                if base is not None:
                    fh = tf.extractfile(member)
                    if fh is None:
                        raise InvalidAdapter(f"cannot read {member.name[:120]!r} from the tar archive")
                    col.add(base, fh)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if isinstance(e, InvalidAdapter):
                raise
            raise InvalidAdapter(f"the tar archive is damaged: {e}") from e


def collect_files(files: Iterable[tuple[str, bytes]], dest: Path, max_bytes: int, max_files: int) -> Path:
    """Write files sent one by one (multipart), checked like archive members."""
    col = _Collector(max_bytes, max_files)
    for name, data in files:
        base = col.accept(name, len(data))
        if base is not None:
            col.add(base, io.BytesIO(data))
    return col.write(dest)


def pack_dir(src: Path, top: str, fmt: str = "tar.gz") -> bytes:
    """The PEFT files of `src` as an archive whose members sit under `top/` (no absolute paths)."""
    names = [n for n in KEPT if (src / n).is_file()]
    buf = io.BytesIO()
    if fmt == "zip":
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for n in names:
                zf.write(src / n, f"{top}/{n}")
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for n in names:
                data = (src / n).read_bytes()
                info = tarfile.TarInfo(f"{top}/{n}")
                info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
