"""Is an adapter sane to serve? Float factors, bounded entries, and a bounded effect on each base weight.

Finite weights are not enough: an adapter whose factors are 1e30 passes every NaN/Inf check and then drives
the model's activations to Inf. Every way an adapter comes in (upload, generation, loading from the library)
goes through `check_adapter`, which raises `AdapterRejected` naming the module, the layer and the limit.

The effect of module m in layer i is `||scaling · B·A||_F / ||W||_F`, the size of the LoRA update relative to
the base weight it is added to; ||B·A||_F is computed from the two (r, r) Gram matrices, never the dense
(d_out, d_in) product. Shipped generators stay below 0.34 (T2L) and 0.03 (CVAE, SG) on SmolLM2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from generator.limits import AdapterLimits, AdapterRejected  # noqa: F401 - re-exported
from generator.lora import LoraAdapter
from generator.spec import MODULE_PARENTS, ModelSpec

logger = logging.getLogger(__name__)
BaseNorms = dict[str, torch.Tensor]  # module type -> (n_layers,) Frobenius norms of the base weights


def update_norms(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Per module type, `(n_layers,)` Frobenius norms of the dense updates `scaling · B·A` (in float64)."""
    out = {}
    for m in adapter.a:
        a, b = adapter.a[m].double(), adapter.b[m].double()  # (L, r, d_in), (L, d_out, r)
        gram_a = a @ a.transpose(1, 2)  # (L, r, r)
        gram_b = b.transpose(1, 2) @ b  # (L, r, r)
        out[m] = adapter.scaling * (gram_a * gram_b).sum((1, 2)).clamp(min=0).sqrt()  # ||BA||² = tr(BᵀB·AAᵀ)
    return out


def base_norms_from_state(state: Mapping[str, torch.Tensor], spec: ModelSpec) -> BaseNorms:
    """Base-weight norms from a HF state dict (`model.layers.{i}.{self_attn|mlp}.{m}.weight`)."""
    out = {}
    for m, parent in MODULE_PARENTS.items():
        keys = [f"model.layers.{i}.{parent}.{m}.weight" for i in range(spec.n_layers)]
        if all(k in state for k in keys):
            out[m] = torch.stack([state[k].detach().double().norm() for k in keys])
    return out


def base_norms_from_model(model, spec: ModelSpec) -> BaseNorms:
    return base_norms_from_state(dict(model.named_parameters()), spec)


def base_norms_from_dir(model_dir: str | Path, spec: ModelSpec) -> BaseNorms | None:
    """Base-weight norms read tensor by tensor from a HF directory's safetensors; None when it has none (GGUF)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    wanted = {f"model.layers.{i}.{p}.{m}.weight" for m, p in MODULE_PARENTS.items() for i in range(spec.n_layers)}
    norms: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in wanted & set(fh.keys()):
                norms[key] = fh.get_tensor(key).double().norm()
    return base_norms_from_state(norms, spec)


def check_adapter(adapter: LoraAdapter, limits: AdapterLimits, base_norms: BaseNorms | None = None) -> None:
    """Raise AdapterRejected unless every factor is floating point, finite and within `limits.max_factor_abs`,
    and (with `base_norms`) every module's update is within `limits.max_relative_update` of its base weight."""
    for kind, tensors in (("lora_A", adapter.a), ("lora_B", adapter.b)):
        for m, t in tensors.items():
            if not t.dtype.is_floating_point:
                raise AdapterRejected(f"{m}.{kind} is {t.dtype}; LoRA factors must be floating point")
            if not torch.isfinite(t).all():
                raise AdapterRejected(f"{m}.{kind} holds NaN or Inf values")
            peak = float(t.abs().max()) if t.numel() else 0.0
            if peak > limits.max_factor_abs:
                raise AdapterRejected(f"{m}.{kind} has an entry of magnitude {peak:.3g}; the limit is "
                                      f"{limits.max_factor_abs:g} (adapter_limits.max_factor_abs)")
    if not base_norms:
        return
    for m, upd in update_norms(adapter).items():
        if m not in base_norms:
            continue
        ratio = upd / base_norms[m].clamp(min=1e-12)  # (n_layers,)
        worst = int(ratio.argmax())
        if not float(ratio[worst]) <= limits.max_relative_update:
            raise AdapterRejected(f"{m} in layer {worst}: the update's norm is {float(ratio[worst]):.3g} times the "
                                  f"base weight's; the limit is {limits.max_relative_update:g} "
                                  f"(adapter_limits.max_relative_update)")
