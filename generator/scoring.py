"""Scoring known answers under a prompt: the answer tokens' cross-entropy, with or without an adapter.

Training minimises it. `strength_from_examples` is a request-time rule, measured but not served: it weighs a
generated adapter against the examples a user put in the prompt (each example's answer scored from the instruction
and the other examples, at several adapter strengths; the strength that predicts the examples best wins), so an
adapter that imposes answer words the examples contradict steps back (strength 0 is the base model). On held-out
train tasks it lost to the checkpoint's fixed strength (training/strength.py, README "Strength with examples").
`gate_from_examples` asks the examples a yes/no question instead: answered greedily from the others, does the
adapter reproduce them at least as well as the base model does (training/example_gate.py measures it)?
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from generator.lora import LoraAdapter
from generator.prompt import task_prompt

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the adapter strengths `strength_from_examples` chooses among


class Batcher:
    """Tokenises (prompt, answer) pairs into right-padded batches with loss only on the answer tokens."""

    def __init__(self, tokenizer, max_prompt_tokens: int = 256, max_answer_tokens: int = 64) -> None:
        from generator.inference import stop_ids

        self.tok = tokenizer
        self.max_prompt, self.max_answer = max_prompt_tokens, max_answer_tokens
        self.stop = stop_ids(tokenizer)[-1]  # <|im_end|> for chat models
        self._cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        key = (prompt, answer)
        if key not in self._cache:
            p = self.tok(prompt, add_special_tokens=False)["input_ids"][-self.max_prompt:]
            a = self.tok(answer, add_special_tokens=False)["input_ids"][: self.max_answer - 1] + [self.stop]
            self._cache[key] = (p, a)
        return self._cache[key]

    def batch(self, pairs: Sequence[tuple[str, str]], device: torch.device | str) -> dict[str, torch.Tensor]:
        enc = [self.encode(p, a) for p, a in pairs]
        width = max(len(p) + len(a) for p, a in enc)
        pad = self.tok.pad_token_id
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        labels = torch.full((len(enc), width), -100, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, (p, a) in enumerate(enc):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p): len(seq)] = torch.tensor(a)
            mask[i, : len(seq)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def answer_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sequence's mean answer-token cross-entropy, `(B,)`.

    The LM head runs only where a next token is scored (the answer tokens), not over the whole
    `(batch, seq, vocab)` grid: with a 49k vocabulary that is most of a step's memory.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted from position t
    mask = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()  # (n_answer_tokens, vocab)
    ce = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="none")
    seq = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]  # owner of each token
    per_seq = torch.zeros(labels.shape[0], device=ce.device).index_add_(0, seq, ce)
    return per_seq / mask.sum(1).clamp(min=1)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over sequences of each sequence's mean answer-token cross-entropy."""
    return answer_losses(model, batch).mean()


def leave_one_out(tok, instruction: str | None, examples: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(prompt, answer) per example: its input under `instruction` with the other examples as earlier turns."""
    return [(task_prompt(tok, instruction, x, [e for j, e in enumerate(examples) if j != i]), y)
            for i, (x, y) in enumerate(examples)]


@torch.no_grad()
def strength_from_examples(model, tok, injector, spec, adapter: LoraAdapter, instruction: str | None,
                           examples: Sequence[tuple[str, str]], strengths: Sequence[float] = STRENGTHS,
                           device: torch.device | str = "cpu", max_prompt_tokens: int = 1024
                           ) -> tuple[float, dict[str, float]]:
    """The strength in `strengths` at which `adapter` best predicts each example from the others (mean
    leave-one-out answer loss; ties go to the weaker strength), and the loss at each. Needs >= 2 examples."""
    from generator.apply import AdapterBank

    if len(examples) < 2:
        raise ValueError(f"choosing a strength from examples needs at least 2 examples, got {len(examples)}")
    pairs = leave_one_out(tok, instruction, examples)
    batch = Batcher(tok, max_prompt_tokens).batch(pairs * len(strengths), device)  # strength-major rows
    scaled = [replace(adapter, alpha=adapter.alpha * s) for s in strengths]
    dtype = next(model.parameters()).dtype
    bank = AdapterBank.from_adapters(scaled, spec, device, dtype)
    index = torch.arange(len(strengths), device=device).repeat_interleave(len(pairs))
    with injector.use(bank.gather(index)):
        per_row = answer_losses(model, batch).view(len(strengths), len(pairs)).mean(1)
    loss = {f"{s:g}": round(float(v), 4) for s, v in zip(strengths, per_row.tolist(), strict=True)}
    best = min(range(len(strengths)), key=lambda i: (round(per_row[i].item(), 4), strengths[i]))
    return float(strengths[best]), loss


def lcs_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased whitespace tokens (longest common subsequence), in [0, 1]; dependency-free."""
    a, b = prediction.lower().split(), reference.lower().split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


@torch.no_grad()
def gate_from_examples(model, tok, injector, spec, adapter: LoraAdapter, instruction: str | None,
                       examples: Sequence[tuple[str, str]], device: torch.device | str = "cpu",
                       max_new_tokens: int = 32) -> tuple[bool, dict[str, float]]:
    """Whether to use `adapter` beside these in-context examples: each example is answered greedily from the
    instruction and the others (leave-one-out), with the adapter and without; the adapter stays unless its answers
    match the examples' (`lcs_f1`, mean) less well than the base model's. Ties keep it. Needs >= 2 examples."""
    from generator.apply import AdapterBank
    from generator.inference import generate_text

    if len(examples) < 2:
        raise ValueError(f"gating an adapter on examples needs at least 2 examples, got {len(examples)}")
    pairs = leave_one_out(tok, instruction, examples)
    prompts = [p for p, _ in pairs]
    bank = AdapterBank.from_adapters([adapter], spec, device, next(model.parameters()).dtype)
    lora = bank.gather(torch.zeros(len(prompts), dtype=torch.long, device=device))
    with_adapter = generate_text(model, tok, prompts, injector, lora, max_new_tokens)
    without = generate_text(model, tok, prompts, injector, None, max_new_tokens)
    score = {name: sum(lcs_f1(o, y) for o, (_, y) in zip(outs, pairs, strict=True)) / len(pairs)
             for name, outs in (("adapter", with_adapter), ("base", without))}
    return score["adapter"] >= score["base"], score
