"""Greedy generation with per-sample adapters, shared by evaluation, training and serving
(prompts come from generator.prompt)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from generator.apply import LoraInjector, PerSampleLora


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn (SmolLM2: `<|im_end|>`), which `generate` must be told."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_text(model, tokenizer, prompts: Sequence[str], injector: LoraInjector | None = None,
                  lora: PerSampleLora | None = None, max_new_tokens: int = 32) -> list[str]:
    """Greedy completions of `prompts`; sample i uses lora's i-th per-sample factors when given."""
    if lora is not None and lora.batch_size != len(prompts):
        raise ValueError(f"{lora.batch_size} per-sample adapters for {len(prompts)} prompts")
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    stops = stop_ids(tokenizer)

    def run():
        return model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                              pad_token_id=tokenizer.pad_token_id)

    if injector is not None:
        with injector.use(lora):
            out = run()
    else:
        out = run()
    new = out[:, enc["input_ids"].shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
