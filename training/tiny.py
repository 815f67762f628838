"""A tiny random Llama with the embedded model's tokenizer: what `--tiny` runs use on the CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from generator.models import resolve_base_model


def make_tiny_model_dir(out: str | Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Write (once) a `layers`-layer random Llama that shares SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(resolve_base_model())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
