"""A fixed-shape decode step for Llama-family models, captured as one CUDA graph per shape on CUDA.

The step runs the model's math directly on its weights (no `model.forward`, no HF cache object): for the
first `b` slots of the KV cache (a batch-size bucket 1, 2, 4, ..., max) it embeds each row's token, and per
layer applies RMSNorm, the fused q/k/v projection plus each row's gathered LoRA delta, rotary at the
row's own position, writes the new key/value into the row's slot, attends over the first `window`
positions of the slot (GQA, positions past the row's own masked), o projection, RMSNorm and the fused
gate/up SwiGLU MLP; then the final norm, the logits, and the next token chosen on the device. All inputs
and outputs live in pre-allocated buffers that the step reads and updates in place (it writes the chosen
token back as the next input and advances positions and counters), so a captured graph replays with no
host work; the host reads the chosen tokens once per step. On the CPU the same code runs eagerly.
Imports only torch, `generator` and the pool/slot/sampling rooms.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from generator.spec import ModelSpec
from serve.adapter_pool import AdapterPool, lora_delta
from serve.device_sampling import choose_tokens
from serve.engine_config import StaticDecodeConfig  # noqa: F401 - re-exported
from serve.kv_slots import KVSlots

logger = logging.getLogger(__name__)

CAPTURE_TRIES = 3  # captures of one shape that may fail before it runs eagerly for good


def buckets(limit: int, start: int = 1) -> list[int]:
    """start, 2*start, 4*start, ... below `limit`, then `limit`."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return [*out, limit]


def supports(model) -> str | None:
    """Why `model` cannot run the static step, or None when it can (plain Llama decoder layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return "the model has no model.layers"
    kinds = {type(layer.self_attn).__name__ for layer in layers} | {type(layer.mlp).__name__ for layer in layers}
    if kinds != {"LlamaAttention", "LlamaMLP"}:
        return f"the static step runs Llama attention and MLP only, found {sorted(kinds)}"
    if getattr(model.config, "sliding_window", None):
        return "sliding-window attention is not supported by the static step"
    return None


def compiled(fn):
    """`fn` through torch.compile, one specialisation per shape (the int arguments are constants to it)."""
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(fn, dynamic=False)


def _base(linear) -> torch.nn.Linear:
    return getattr(linear, "base", linear)  # unwrap the engine's MultiLoraLinear


def _cat_linear(mods) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused weight `(sum d_out, d_in)` (and bias) for linears sharing an input."""
    lins = [_base(m) for m in mods]
    bias = None if lins[0].bias is None else torch.cat([m.bias.detach() for m in lins])
    return torch.cat([m.weight.detach() for m in lins]), bias


class StaticStep:
    """The weights, KV slots, adapter pool and I/O buffers of the static decode step, and its graphs."""

    def __init__(self, model, spec: ModelSpec, slots: KVSlots, pool: AdapterPool | None, cfg: StaticDecodeConfig,
                 device: torch.device) -> None:
        self.cfg, self.slots, self.pool, self.device = cfg, slots, pool, device
        conf = model.config
        self.n_heads, self.n_kv = conf.num_attention_heads, conf.num_key_value_heads or conf.num_attention_heads
        self.head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // self.n_heads
        self.eps = conf.rms_norm_eps
        self.embed = model.get_input_embeddings().weight.detach()  # (vocab, D)
        self.lm_head = model.get_output_embeddings().weight.detach()  # (vocab, D)
        self.final_norm = model.model.norm.weight.detach()
        self.layers = []
        for layer in model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "norm1": layer.input_layernorm.weight.detach(), "norm2": layer.post_attention_layernorm.weight.detach(),
                "qkv": _cat_linear([at.q_proj, at.k_proj, at.v_proj]), "o": _cat_linear([at.o_proj]),
                "gate_up": _cat_linear([mlp.gate_proj, mlp.up_proj]), "down": _cat_linear([mlp.down_proj]),
                "act": mlp.act_fn,
            })
        self.scale = self.head_dim ** -0.5
        self.hf_numerics = cfg.numerics == "hf"
        pos = torch.arange(slots.max_len, device=device)[None]  # (1, max_len)
        cos, sin = model.model.rotary_emb(self.embed[:1, None], pos)  # (1, max_len, hd) each, the model's own rope
        half = self.head_dim // 2
        self.cos = cos[0]  # (max_len, hd)
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # rotate_half's sign folded in
        n = slots.n_slots
        i64 = dict(device=device, dtype=torch.long)
        self.tokens = torch.zeros(n, **i64)  # next input token per slot; the step writes the chosen one back
        self.pos = torch.zeros(n, **i64)  # position of that token
        self.temperature = torch.zeros(n, device=device)
        self.top_p = torch.ones(n, device=device)
        self.seed = torch.zeros(n, **i64)
        self.counter = torch.zeros(n, **i64)  # tokens drawn so far per row: the sampling noise's counter
        self.logits = torch.zeros(n, self.lm_head.shape[0], device=device)  # (slots, vocab) float32
        self.use_graphs = cfg.cuda_graphs and device.type == "cuda"
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._failed: dict[tuple, int] = {}  # failed captures per shape; CAPTURE_TRIES of them: eager for good
        self._mempool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._step = compiled(self.forward) if cfg.compile else self.forward

    # ---- the math ------------------------------------------------------------------------------------
    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.hf_numerics:  # HF Llama: normalise in fp32, round, then scale
            return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * w
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)  # one fused kernel on CUDA (fp32 inside)

    def base_linear(self, x: torch.Tensor, layer: int, group: str, residual: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x @ W^T of `group` at `layer`, `residual` added in the same kernel where the numerics allow: the result
        and the residual still to add (None once added). x `(rows, d_in)` -> `(rows, d_out)`."""
        w, bias = self.layers[layer][group]
        if residual is not None and not self.hf_numerics:
            return torch.addmm(residual if bias is None else residual + bias, x, w.t()), None
        return F.linear(x, w, bias), residual

    def _linear(self, x: torch.Tensor, layer: int, group: str, b: int, k: int, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x @ W^T (+ residual, in the same kernel) + each row's LoRA delta of `group` when k > 0."""
        y, residual = self.base_linear(x, layer, group, residual)
        factors = self.pool.row_factors(group, layer, b, k) if k and self.pool is not None else None
        if factors is not None:
            y = lora_delta(x, y, *factors, fused=not self.hf_numerics)
        return y if residual is None else residual + y

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x `(b, heads, hd)`; cos `(b, 1, hd)`; sin `(b, 1, hd)` with the first half negated (rotate_half's sign)."""
        half = x.shape[-1] // 2
        rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin if self.hf_numerics else torch.addcmul(x * cos, rotated, sin)

    def _attend(self, layer: int, q, k, v, rows, wpos, bias, window: int) -> torch.Tensor:
        """q `(b, H, hd)`, k/v `(b, KV, hd)`; writes k/v at each row's position, attends its slot -> `(b, H*hd)`."""
        keys, values = self.slots.keys[layer], self.slots.values[layer]
        keys[rows, :, wpos] = k
        values[rows, :, wpos] = v
        b = q.shape[0]
        qg = q.reshape(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)  # (b, KV, G, hd): G queries a kv head
        out = F.scaled_dot_product_attention(qg, keys[:b, :, :window], values[:b, :, :window], attn_mask=bias,
                                             scale=self.scale)  # (b, KV, G, hd)
        return out.reshape(b, self.n_heads * self.head_dim)

    def forward(self, b: int, window: int, k: int, sample: bool) -> None:
        """One decode step for slots 0..b-1 (k: mixture entries per row, 0 for none), updating the buffers in place."""
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        pos = self.pos[:b]
        wpos = pos.clamp(max=self.slots.max_len - 1)
        rows = torch.arange(b, device=self.device)
        bias = torch.where(torch.arange(window, device=self.device)[None] <= pos[:, None], 0.0, float("-inf"))
        bias = bias.to(self.embed.dtype)[:, None, None, :]  # (b, 1, 1, W): 0 where a row may attend, -inf past it
        cos, sin = self.cos[wpos][:, None], self.sin[wpos][:, None]  # (b, 1, hd)
        x = F.embedding(self.tokens[:b], self.embed)  # (b, D)
        for i, layer in enumerate(self.layers):
            qkv = self._linear(self._norm(x, layer["norm1"]), i, "qkv", b, k)  # (b, (H + 2 KV) * hd)
            qk = self._rope(qkv[:, : (nh + nkv) * hd].view(b, nh + nkv, hd), cos, sin)
            v = qkv[:, (nh + nkv) * hd:].view(b, nkv, hd)
            attn = self._attend(i, qk[:, :nh], qk[:, nh:], v, rows, wpos, bias, window)
            x = self._linear(attn, i, "o", b, k, residual=x)
            gate, up = self._linear(self._norm(x, layer["norm2"]), i, "gate_up", b, k).chunk(2, dim=-1)
            x = self._linear(layer["act"](gate) * up, i, "down", b, k, residual=x)
        logits = self.logits[:b]
        logits.copy_(F.linear(self._norm(x, self.final_norm), self.lm_head))  # (b, vocab) float32
        chosen = choose_tokens(logits, self.temperature[:b], self.top_p[:b], self.seed[:b], self.counter[:b], sample)
        self.tokens[:b].copy_(chosen)
        self.pos[:b].add_(1)
        self.counter[:b].add_(1)

    # ---- running: eager or graph replay --------------------------------------------------------------
    def run(self, b: int, window: int, k: int, sample: bool) -> None:
        key = (b, window, k, sample)
        if not self.use_graphs:
            self._step(*key)
            return
        graph = self._graphs.get(key)
        if graph is None and self._failed.get(key, 0) < CAPTURE_TRIES:  # a failed capture is tried again later
            graph = self._capture(key)
            if graph is None:
                self._failed[key] = self._failed.get(key, 0) + 1
            else:
                self._graphs[key] = graph
        if graph is None:
            self._step(*key)
        else:
            graph.replay()

    def _capture(self, key: tuple) -> torch.cuda.CUDAGraph | None:
        """Warm up `key`'s step (restoring the state it advances), capture it; None if capture fails."""
        state = [t.clone() for t in (self.tokens, self.pos, self.counter, self.logits)]

        def restore() -> None:
            for t, saved in zip((self.tokens, self.pos, self.counter, self.logits), state, strict=True):
                t.copy_(saved)

        got = capture_graph(lambda: self._step(*key), self.device, self._mempool,
                            f"the decode step for (batch, window, mix, sample) {key}", warmups=2, reset=restore)
        restore()  # capture records without running, but keep the state exact either way
        return None if got is None else got[0]


def capture_graph(fn, device: torch.device, pool, what: str, warmups: int = 1, reset=None):
    """Warm `fn` up `warmups` times on a side stream (`reset()` after each), then capture it as one CUDA graph in
    the memory `pool`: (graph, what `fn` returned while captured: its static output), or None if the capture failed
    (logged; the caller runs `what` eagerly). Shared by the decode step and the prefill."""
    t0 = time.perf_counter()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
            if reset is not None:
                reset()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: work of other threads (none is expected: the engine runs on one thread) neither breaks
        # the capture nor fails itself
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
    except RuntimeError as e:  # an op that cannot be captured
        logger.warning("CUDA graph capture of %s failed (%s); running it eagerly", what, e)
        torch.cuda.synchronize(device)
        return None
    logger.info("captured %s in %.0f ms", what, 1e3 * (time.perf_counter() - t0))
    return graph, out
