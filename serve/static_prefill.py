"""Prefill for the static decode path: new rows' prompts go through the static step's own math straight into
their KV slots, each row with its LoRA from the adapter pool.

Prompts are right-padded (a row's positions are 0..len-1, so causal attention is exact for its real positions and
padding only follows them), run as one batch (rows x longest prompt, in chunks of at most `prefill_tokens`), and the
logits after each prompt's last token come back for its first token. Keys and values written past a row's length
are garbage that decoding overwrites before any row attends to it.

On CUDA each chunk is padded to a shape bucket (rows 1, 2, 4, ...; length 16, 24, 32, 48, 64, ...: half steps, so
that padding wastes at most a third of a prefill; mixture entries) and that shape is captured once as a CUDA graph
(through torch.compile first when `static.compile` is on, as the decode step): an eager prefill is hundreds of
small kernels whose launches (not the GPU) take ~15 ms, and in serving every admission of new requests stalls the
running decode batch for that long. Padding rows write into a spare KV slot and read a spare adapter-pool row,
never a live one. Each chunk's logits are copied out of its shape's output buffer, which the next chunk of the same
shape replays into. Imports only torch and the step/pool rooms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve.adapter_pool import lora_delta_seq
from serve.static_step import CAPTURE_TRIES, StaticStep, buckets, capture_graph, compiled

MIN_LENGTH_BUCKET = 16


@dataclass
class _Shape:
    """One padded prefill shape: its static inputs, its output, and its CUDA graph once captured."""

    ids: torch.Tensor  # (rows, T) token ids, right-padded
    rows: torch.Tensor  # (rows,) KV slot of each row (the spare slot for padding rows)
    last: torch.Tensor  # (rows,) position of each prompt's last token
    logits: torch.Tensor | None = None  # (rows, vocab) float32, written by the graph
    graph: torch.cuda.CUDAGraph | None = None
    failed: int = 0


def chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges whose rows x longest length stays within `budget` (at least one row each)."""
    out, lo, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > lo and max(longest, n) * (i + 1 - lo) > budget:
            out.append((lo, i))
            lo, longest = i, 0
        longest = max(longest, n)
    return [*out, (lo, len(lengths))]


class StaticPrefill:
    """Prefills rows of a `StaticStep`'s KV slots; `padded` (on with CUDA graphs) runs bucketed shapes."""

    def __init__(self, step: StaticStep, max_rows: int, spare: int) -> None:
        self.step, self.cfg = step, step.cfg
        self.spare = spare  # a KV slot and adapter-pool row that no sequence holds: padding rows use it
        self.row_buckets = buckets(max_rows)
        self.length_buckets = half_step_buckets(step.slots.max_len, min(MIN_LENGTH_BUCKET, step.slots.max_len))
        self.padded = step.use_graphs
        # compiled only with graphs: padded shapes are few, exact ones would recompile for every prompt length
        self._forward = compiled(self.forward) if self.cfg.compile and self.padded else self.forward
        self._shapes: dict[tuple[int, int, int], _Shape] = {}

    @torch.inference_mode()
    def __call__(self, rows: list[int], prompts: list[list[int]], k: int) -> torch.Tensor:
        """Prefill `prompts` into the KV slots `rows` with the rows' LoRA (k mixture entries, assigned in the pool
        beforehand); the logits after each prompt `(n, vocab)` float32."""
        out = []
        for lo, hi in chunks([len(p) for p in prompts], self.cfg.prefill_tokens):
            run = self._padded if self.padded else self._exact
            out.append(run(rows[lo:hi], prompts[lo:hi], k))
        return torch.cat(out)

    def _exact(self, rows: list[int], prompts: list[list[int]], k: int) -> torch.Tensor:
        dev = self.step.device
        ids = _right_padded(prompts, max(map(len, prompts))).to(dev)
        last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
        return self.forward(ids, torch.tensor(rows, device=dev), last, k)

    def _padded(self, rows: list[int], prompts: list[list[int]], k: int) -> torch.Tensor:
        n = len(prompts)
        nb = next(b for b in self.row_buckets if b >= n)
        tb = next(t for t in self.length_buckets if t >= max(map(len, prompts)))
        shape = self._shape(nb, tb, k)
        shape.ids.copy_(_right_padded(prompts, tb, nb))
        shape.rows.copy_(torch.tensor(rows + [self.spare] * (nb - n)))
        shape.last.copy_(torch.tensor([len(p) - 1 for p in prompts] + [0] * (nb - n)))
        if shape.graph is None and self.step.use_graphs and shape.failed < CAPTURE_TRIES:
            self._capture((nb, tb, k), shape)
        if shape.graph is None:
            return self._forward(shape.ids, shape.rows, shape.last, k)[:n]
        shape.graph.replay()
        return shape.logits[:n].clone()  # the next chunk of this shape replays into the same buffer

    def _shape(self, nb: int, tb: int, k: int) -> _Shape:
        if (nb, tb, k) not in self._shapes:
            dev = self.step.device
            self._shapes[nb, tb, k] = _Shape(torch.zeros(nb, tb, dtype=torch.long, device=dev),
                                             torch.zeros(nb, dtype=torch.long, device=dev),
                                             torch.zeros(nb, dtype=torch.long, device=dev))
        return self._shapes[nb, tb, k]

    def _capture(self, key: tuple[int, int, int], shape: _Shape) -> None:
        """Warm `key` up (it prefills the rows for real: writes are idempotent), then capture it."""
        got = capture_graph(lambda: self._forward(shape.ids, shape.rows, shape.last, key[2]), self.step.device,
                            self.step._mempool, f"the prefill for (rows, length, mix) {key}")
        if got is None:  # this shape runs eagerly (tried again later)
            shape.failed += 1
        else:
            shape.graph, shape.logits = got

    # ---- the math ------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, rows: torch.Tensor, last: torch.Tensor, k: int) -> torch.Tensor:
        """ids `(n, T)` right-padded, rows `(n,)` KV slots, last `(n,)` each prompt's last position -> the logits
        there `(n, vocab)` float32; writes each row's keys and values at slot positions 0..T-1."""
        st = self.step
        (n, t), hd, nh, nkv = ids.shape, st.head_dim, st.n_heads, st.n_kv
        cos, sin = st.cos[None, :t, None], st.sin[None, :t, None]  # (1, T, 1, hd)
        x = F.embedding(ids, st.embed).view(n * t, -1)  # (n*T, D)
        lora = st.pool.rows_factors(rows, k) if k and st.pool is not None else {}  # group -> (L, n, kW, d) x 2
        for i, layer in enumerate(st.layers):
            qkv = self._linear(st._norm(x, layer["norm1"]), i, "qkv", lora, n)  # (n*T, (H + 2 KV) * hd)
            qk = st._rope(qkv[:, : (nh + nkv) * hd].view(n, t, nh + nkv, hd), cos, sin).transpose(1, 2)
            v = qkv[:, (nh + nkv) * hd:].view(n, t, nkv, hd).transpose(1, 2)  # (n, KV, T, hd)
            q, key = qk[:, :nh], qk[:, nh:]  # (n, H, T, hd), (n, KV, T, hd)
            st.slots.keys[i][rows, :, :t] = key
            st.slots.values[i][rows, :, :t] = v
            g = nh // nkv
            attn = F.scaled_dot_product_attention(q, key.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                  is_causal=True, scale=st.scale)  # (n, H, T, hd)
            attn = attn.transpose(1, 2).reshape(n * t, nh * hd)
            x = self._linear(attn, i, "o", lora, n, residual=x)
            gate, up = self._linear(st._norm(x, layer["norm2"]), i, "gate_up", lora, n).chunk(2, dim=-1)
            x = self._linear(layer["act"](gate) * up, i, "down", lora, n, residual=x)
        x = x.view(n, t, -1)[torch.arange(n, device=x.device), last]  # (n, D): each prompt's last position
        return F.linear(st._norm(x, st.final_norm), st.lm_head).float()  # (n, vocab)

    def _linear(self, x: torch.Tensor, layer: int, group: str, lora: dict, n: int,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The step's `_linear` over whole prompts: x `(n*T, d_in)` -> `(n*T, d_out)`, each row its own LoRA."""
        st = self.step
        y, residual = st.base_linear(x, layer, group, residual)
        if group in lora:
            a, bt = lora[group]
            y = lora_delta_seq(x.view(n, -1, x.shape[-1]), y.view(n, -1, y.shape[-1]), a[layer], bt[layer],
                               fused=not st.hf_numerics).view(y.shape)
        return y if residual is None else residual + y


def half_step_buckets(limit: int, start: int) -> list[int]:
    """start, 1.5 start, 2 start, 3 start, 4 start, ... (multiples of 8 once start is) below `limit`, then `limit`."""
    out = []
    for b in buckets(limit, start)[:-1]:
        out += [b, b + b // 2] if b >= 2 else [b]
    return [b for b in out if b < limit] + [limit]


def _right_padded(prompts: list[list[int]], t: int, n: int | None = None) -> torch.Tensor:
    """`(n, t)` token ids, each prompt from position 0, zeros after (and in rows past the prompts)."""
    ids = torch.zeros(n or len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    return ids
