"""Key vectors of the default library, embedded once and shipped, so that a first start does not embed them.

The default library's adapters are keyed by the default tasks' texts (retriever/data/default_tasks.json): their
sample inputs (the input router), 32 descriptions (the description strategy) and an instruction (a generated
adapter's first description). Embedding those ~16,000 texts takes a 2-core CPU over a minute, every time a fresh
install starts. `retriever/data/default_keys.safetensors` holds each such key's vector under its content digest
(`keys.key_digest`: the key kind and its exact texts), with the embedder's name: an index build takes from it
the keys whose digest it holds, when its embedder is that one, and embeds the rest as before. A key whose texts
differ in any way (another prefix, another number of descriptions, a user's adapter) has another digest and is
embedded. Only safetensors and JSON: the file is data, never code.

    python -m retriever.shipped_keys     # rewrites the file with the default embedder (a few minutes on a CPU)
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from retriever.config import RetrieverConfig
from retriever.keys import key_digest, key_texts
from retriever.strategy_config import key_configs
from retriever.tasks import load_default_tasks

logger = logging.getLogger(__name__)
SHIPPED_KEYS_FILE = Path(__file__).resolve().parent / "data" / "default_keys.safetensors"


def default_key_configs(key_descriptions: int) -> list[RetrieverConfig]:
    """The key settings the service builds the default library's indexes with: the input router's (defaults), the
    description strategy's by descriptions and by instructions."""
    base = RetrieverConfig()
    return [base, *key_configs(base, key_descriptions)]


def default_key_texts(key_descriptions: int) -> dict[str, list[str]]:
    """digest -> texts of every key the default tasks give under `default_key_configs`."""
    out: dict[str, list[str]] = {}
    for t in load_default_tasks():
        record = SimpleNamespace(descriptions=t["descriptions"], sample_inputs=t["sample_inputs"],
                                 instruction=t["descriptions"][0])
        for cfg in default_key_configs(key_descriptions):
            for kind, texts in key_texts(record, cfg).items():
                out[key_digest(kind, texts)] = texts
    return out


@lru_cache(maxsize=4)
def _read(path: str, mtime_ns: int) -> tuple[str, tuple[str, ...], np.ndarray]:
    with safe_open(path, "np") as f:
        meta = f.metadata() or {}
        return meta.get("embedder", ""), tuple(json.loads(meta.get("digests", "[]"))), f.get_tensor("vectors")


def shipped_keys(embedder: str, dim: int, path: Path = SHIPPED_KEYS_FILE) -> dict[str, np.ndarray]:
    """digest -> unit key vector `(dim,)` float32 from the shipped file; empty for another embedder or no file."""
    try:
        name, digests, vectors = _read(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if path.exists():
            logger.warning("ignoring the shipped key vectors %s: %s", path, e)
        return {}
    if name != embedder or vectors.ndim != 2 or vectors.shape[1] != dim or len(digests) != len(vectors):
        return {}
    return dict(zip(digests, vectors.astype(np.float32), strict=True))


def export(encoder, key_descriptions: int, path: Path = SHIPPED_KEYS_FILE) -> Path:
    """Embed every default key and write the file (float16 vectors: 0.5 MB less, cosines within 1e-3)."""
    keys = default_key_texts(key_descriptions)
    texts = [t for kt in keys.values() for t in kt]
    emb = encoder.encode(texts, what="default key text").cpu().numpy()  # (n_texts, dim)
    bounds = np.cumsum([0] + [len(kt) for kt in keys.values()])
    vectors = np.stack([emb[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    save_file({"vectors": vectors.astype(np.float16)}, str(path),
              metadata={"embedder": encoder.name, "digests": json.dumps(list(keys)),
                        "what": "the default library's key vectors by content digest (retriever/shipped_keys.py)"})
    path.chmod(0o644)  # safetensors writes 0600; the file ships with the package
    _read.cache_clear()
    return path


def main() -> None:
    from generator.encoder import TaskEncoder
    from retriever.strategy_config import StrategyConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = export(TaskEncoder.load(), StrategyConfig().key_descriptions)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
