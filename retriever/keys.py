"""Adapter keys: the vectors an input is matched against.

LoraRetriever represents a LoRA by the mean embedding of a few of its training inputs; an adapter with no
known inputs (e.g. one generated from a sentence) is represented by the mean embedding of its descriptions.
An adapter made or trained for an instruction (`AdapterRecord.instruction`, from its hyperlora.json: a trained
LoRA's task definition, a generated adapter's description) also has that instruction as a key of its own
(`key_mode="instruction"`): a description that restates it finds the adapter even when its descriptions are
paraphrases of it. `key_mode` picks which keys an adapter gets; with two keys, an adapter scores the better.
Labels are derived from the adapter id, so they are the same in every process and across rebuilds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from retriever.config import RetrieverConfig
from retriever.records import AdapterRecord

KIND_DESCRIPTION, KIND_INPUTS, KIND_INSTRUCTION = 0, 1, 2
KINDS = 4  # label slots per adapter: base label + kind (one spare)
LABELS_FORMAT = "sha256(id) * 4 + kind"  # in the index signature: saved indexes with other labels are rebuilt
MAX_EMBED_CHARS = 1000  # longer texts are cut: the default embedder reads 256 tokens anyway


def embed_text(text: str, prefix: str = "") -> str:
    return (prefix + text)[:MAX_EMBED_CHARS]


def key_texts(record: AdapterRecord, cfg: RetrieverConfig) -> dict[int, list[str]]:
    """kind -> the texts whose mean embedding is that key."""
    if cfg.key_mode == "instruction":
        return {KIND_INSTRUCTION: [embed_text(record.instruction)]} if record.instruction else {}
    desc = [embed_text(d) for d in record.descriptions[: cfg.key_descriptions]]
    samples = [embed_text(s, cfg.query_prefix) for s in record.sample_inputs[: cfg.key_samples]]
    if cfg.key_mode == "description" or (cfg.key_mode == "inputs_else_description" and not samples):
        return {KIND_DESCRIPTION: desc}
    if cfg.key_mode == "both":
        return {KIND_DESCRIPTION: desc, **({KIND_INPUTS: samples} if samples else {})}
    return {KIND_INPUTS: samples} if samples else {}  # inputs / inputs_else_description with samples


def keys_per_adapter(cfg: RetrieverConfig) -> int:
    return 2 if cfg.key_mode == "both" else 1


def base_label(adapter_id: str) -> int:
    """A stable 60-bit label for an adapter; its keys are base + kind (kind < KINDS)."""
    return (int(hashlib.sha256(adapter_id.encode()).hexdigest()[:15], 16) * KINDS) & ((1 << 62) - 1)


def kind_of(label: int | np.ndarray) -> int | np.ndarray:
    """The key kind of a key label (KIND_DESCRIPTION, KIND_INPUTS or KIND_INSTRUCTION)."""
    return label % KINDS


def assign_labels(ids: Sequence[str]) -> dict[str, int]:
    """id -> base label, probing past the (astronomically rare) collision deterministically."""
    out, used = {}, set()
    for i in sorted(ids):
        label = base_label(i)
        while label in used:
            label += KINDS
        used.add(label)
        out[i] = label
    return out


def key_digest(kind: int, texts: Sequence[str]) -> str:
    """What a key's vector depends on besides the embedder and the prefix (those are in the index signature)."""
    return hashlib.sha256(json.dumps([kind, list(texts)]).encode()).hexdigest()[:24]


def embed_keys(records: Sequence[AdapterRecord], encoder, cfg: RetrieverConfig, labels: dict[str, int],
               cache: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every key of `records`: vectors `(n_keys, dim)` unit-norm, labels `(n_keys,)` and content digests.

    Keys whose digest is in `cache` reuse its vector; the others are embedded in one batched call.
    """
    cache = cache or {}
    keys, texts = [], []  # (label, digest, start, end) per key; texts to embed
    for r in records:
        for kind, kt in key_texts(r, cfg).items():
            digest = key_digest(kind, kt)
            if digest in cache:
                keys.append((labels[r.id] + kind, digest, -1, -1))
            else:
                keys.append((labels[r.id] + kind, digest, len(texts), len(texts) + len(kt)))
                texts += kt
    dim = encoder.dim
    emb = (encoder.encode(texts, what="key text", batch_size=cfg.embed_batch_size).cpu().numpy() if texts
           else np.zeros((0, dim), np.float32))  # (n_texts, dim)
    vectors = np.zeros((len(keys), dim), np.float32)  # (n_keys, dim)
    for row, (_, digest, a, b) in enumerate(keys):
        v = cache[digest] if a < 0 else emb[a:b].mean(0)
        vectors[row] = v / max(float(np.linalg.norm(v)), 1e-12)
    return vectors, np.array([k[0] for k in keys], np.int64), [k[1] for k in keys]
