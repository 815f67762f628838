"""Engine benchmark: decode throughput of the multi-adapter engine against Hugging Face generate + PEFT.

Every scenario decodes the same 32 chat prompts for exactly `--new-tokens` tokens (stop tokens ignored,
`min_new_tokens` for PEFT) so the token counts match; tokens/s is generated tokens over wall time,
prefill included. Scenarios: our engine with the base model, one adapter shared by the batch, 8 and 32
distinct adapters, a 3-adapter mixture per sample; HF generate + PEFT with one shared adapter, PEFT's
mixed batch (`adapter_names=`), and naive per-request switching (`set_adapter`, one request at a time).

Imports only torch, transformers, peft, `generator` and `serve.engine`, so it runs on a machine without
Ray or FAISS:  python -m serve.bench_engine --device cuda --dtype bf16 --gguf-dir /tmp/stage
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from generator.lora import LoraAdapter
from generator.peft_io import save_peft
from generator.spec import ModelSpec
from serve.engine import EngineConfig, GenerationJob, LLMEngine, load_model

logger = logging.getLogger(__name__)

PROMPTS = [
    "Translate 'good morning' into French.", "What is the capital of Japan?", "Write a haiku about the sea.",
    "Summarise: the cat sat on the mat all day.", "Is 17 a prime number?", "Name three primary colours.",
    "Give a synonym for 'happy'.", "What does CPU stand for?", "Sort these numbers: 5, 2, 9, 1.",
    "Classify the sentiment: 'I loved this film.'", "Who wrote Romeo and Juliet?", "Convert 3 km to metres.",
    "What is the opposite of 'cold'?", "Explain photosynthesis in one sentence.", "What is 12 times 12?",
    "Suggest a name for a pet turtle.", "Write a title for a story about a lost key.", "What colour is the sky?",
    "Rewrite politely: 'Give me the report.'", "What is the boiling point of water?", "Spell 'necessary'.",
    "List two uses of a paperclip.", "Answer yes or no: is the Earth flat?", "What is the plural of 'mouse'?",
    "Finish the sentence: The early bird...", "What language is spoken in Brazil?", "Define 'gravity'.",
    "Which is bigger, 10 or 7?", "Name a famous painting.", "What day comes after Monday?",
    "Extract the verb: 'She runs fast.'", "Give an example of a mammal.",
]
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
                 "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def random_adapters(spec: ModelSpec, n: int, rank: int = 8, targets=("q_proj", "v_proj"),
                    seed: int = 1234) -> list[LoraAdapter]:
    """`n` random rank-`rank` adapters shaped like the hypernetwork's output (B small but non-zero)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a = {m: torch.randn(spec.n_layers, rank, spec.shapes[m][0], generator=g) / spec.shapes[m][0] ** 0.5
             for m in targets}
        b = {m: 0.02 * torch.randn(spec.n_layers, spec.shapes[m][1], rank, generator=g) for m in targets}
        out.append(LoraAdapter(spec.name, rank, 2.0 * rank, a, b))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[int], int], device: torch.device, repeats: int, new_tokens: int) -> dict:
    """Warm up with a 2-token run of `fn(n_tokens) -> generated tokens`, then time `repeats` full runs."""
    fn(2)
    times, tokens = [], 0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        tokens = fn(new_tokens)
        _sync(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"tokens": tokens, "seconds": round(sec, 4), "tokens_per_s": round(tokens / sec, 1),
            "runs_s": [round(t, 4) for t in times]}


def _show(name: str, r: dict) -> None:
    print(f"{name:<34} {r['tokens_per_s']:>9.1f} tokens/s  ({r['tokens']} tokens in {r['seconds']:.3f} s)", flush=True)


def engine_scenarios(engine: LLMEngine, prompt_ids: list[list[int]], n_adapters: int, new_tokens: int,
                     repeats: int) -> dict[str, dict]:
    def run(mix: Callable[[int], tuple[tuple[str, float], ...]]) -> Callable[[int], int]:
        def go(n_tokens: int) -> int:
            jobs = [GenerationJob(ids, mix(i), max_new_tokens=n_tokens, ignore_eos=True)
                    for i, ids in enumerate(prompt_ids)]
            return sum(r.completion_tokens for r in engine.generate(jobs))

        return go

    scenarios = {
        "engine_base": lambda i: (),
        "engine_one_adapter": lambda i: (("a0", 1.0),),
        "engine_8_adapters": lambda i: ((f"a{i % 8}", 1.0),),
        f"engine_{n_adapters}_adapters": lambda i: ((f"a{i % n_adapters}", 1.0),),
        "engine_mixture_k3": lambda i: tuple((f"a{(i + j) % n_adapters}", w) for j, w in enumerate((0.5, 0.3, 0.2))),
    }
    out = {}
    for name, mix in scenarios.items():
        out[name] = _timed(run(mix), engine.device, repeats, new_tokens)
        _show(name, out[name])
    return out


def scale_scenarios(engine: LLMEngine, prompt_ids: list[list[int]], batches: list[int], new_tokens: int,
                    repeats: int) -> dict[str, dict]:
    """Larger batches, every sample its own adapter: how far the engine's throughput scales."""
    out = {}
    for b in batches:
        adapters = random_adapters(engine.spec, b, seed=b)
        for i, ad in enumerate(adapters):
            engine.add_adapter(f"s{b}_{i}", ad)
        ids = (prompt_ids * (b // len(prompt_ids) + 1))[:b]
        engine.cfg.max_batch_size = max(engine.cfg.max_batch_size, b)

        def go(n_tokens: int, b=b, ids=ids) -> int:
            jobs = [GenerationJob(x, ((f"s{b}_{i}", 1.0),), max_new_tokens=n_tokens, ignore_eos=True)
                    for i, x in enumerate(ids)]
            return sum(r.completion_tokens for r in engine.generate(jobs))

        name = f"engine_batch{b}_{b}_adapters"
        out[name] = _timed(go, engine.device, repeats, new_tokens)
        _show(name, out[name])
    return out


def peft_scenarios(model, tokenizer, adapters: list[LoraAdapter], prompts: list[str], new_tokens: int,
                   repeats: int, device: torch.device, switching_requests: int) -> dict[str, dict]:
    """HF generate + PEFT: one shared adapter (batched), mixed batch (`adapter_names`), per-request switching."""
    from peft import PeftModel

    tmp = Path(tempfile.mkdtemp(prefix="bench-peft-"))
    dirs = [save_peft(ad, tmp / f"a{i}") for i, ad in enumerate(adapters)]
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        peft_model.load_adapter(str(d), adapter_name=f"a{i}")
    peft_model.eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

    def gen_kw(n: int) -> dict:
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    @torch.inference_mode()
    def batched(n: int, adapter_names=None) -> int:
        extra = {"adapter_names": adapter_names} if adapter_names else {}
        out = peft_model.generate(**batch, **gen_kw(n), **extra)
        return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]

    @torch.inference_mode()
    def switching(n: int) -> int:
        total = 0
        for i, p in enumerate(prompts[:switching_requests if n > 2 else 2]):
            peft_model.set_adapter(f"a{i % len(adapters)}")
            enc = tokenizer([p], return_tensors="pt", add_special_tokens=False).to(device)
            out = peft_model.generate(**enc, **gen_kw(n))
            total += out.shape[1] - enc["input_ids"].shape[1]
        return total

    names = [f"a{i % len(adapters)}" for i in range(len(prompts))]
    out = {}
    peft_model.set_adapter("a0")
    for name, fn in (("peft_one_adapter", batched),
                     (f"peft_mixed_batch_{len(adapters)}_adapters", lambda n: batched(n, names)),
                     ("peft_switching_per_request", switching)):
        out[name] = _timed(fn, device, repeats, new_tokens)
        _show(name, out[name])
    return out


def run_benchmark(device: str = "cpu", dtype: str = "fp32", base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
                  gguf_dir: str | None = None, gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
                  batch: int = 32, n_adapters: int = 32, new_tokens: int = 32, repeats: int = 2,
                  switching_requests: int | None = None, out: str | None = None,
                  scale_batches: tuple[int, ...] = ()) -> dict:
    dtype = DTYPE_ALIASES[dtype]
    dev = torch.device(device)
    cfg = EngineConfig(max_batch_size=batch, device=device, dtype=dtype, targets=("q_proj", "v_proj"),
                       cache_bytes=4 << 30)
    src = gguf_dir or base_model
    model, tokenizer, spec = load_model(src, gguf_file if gguf_dir else None)
    pristine = copy.deepcopy(model).to(dev, cfg.torch_dtype)  # for PEFT: the engine wraps `model`'s linears
    engine = LLMEngine(model, tokenizer, spec, cfg)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in (PROMPTS * 4)[:batch]]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    adapters = random_adapters(engine.spec, n_adapters)
    for i, ad in enumerate(adapters):
        engine.add_adapter(f"a{i}", ad)
    print(f"engine benchmark on {device} ({device_name(dev)}), {dtype}, batch {batch}, {new_tokens} new tokens, "
          f"{n_adapters} rank-8 q/v adapters", flush=True)
    results = engine_scenarios(engine, prompt_ids, n_adapters, new_tokens, repeats)
    results |= scale_scenarios(engine, prompt_ids, list(scale_batches), new_tokens, repeats)
    del engine
    results |= peft_scenarios(pristine, tokenizer, [ad.to(dtype=cfg.torch_dtype) for ad in adapters], prompts,
                              new_tokens, max(1, repeats - 1), dev, switching_requests or batch)
    report = _summarise(results, n_adapters)
    report["setup"] = {"device": device, "device_name": device_name(dev), "dtype": dtype, "batch": batch,
                       "new_tokens": new_tokens, "n_adapters": n_adapters, "adapter_rank": 8,
                       "targets": ["q_proj", "v_proj"], "base_model": engine_name(src, gguf_dir, gguf_file),
                       "threads": torch.get_num_threads(), **software_versions()}
    write_report(report, Path(out) if out else Path("results") / f"bench_engine_{dev.type}.json")
    return report


def software_versions() -> dict[str, str]:
    """The versions a benchmark's figures depend on, for its setup record."""
    return {"torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft"),
            "python": platform.python_version()}


def write_report(report: dict, path: Path) -> None:
    """Print the report's summary lines and write it as JSON to `path`."""
    for k, v in report["summary"].items():
        print(f"{k}: {v}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}" + (f" in {report['setup']['total_s']} s" if "total_s" in report["setup"] else ""),
          flush=True)


def _summarise(results: dict[str, dict], n: int) -> dict:
    tps = {k: v["tokens_per_s"] for k, v in results.items()}
    distinct = tps[f"engine_{n}_adapters"]
    summary = {
        f"engine_{n}_distinct_vs_one_adapter": round(distinct / tps["engine_one_adapter"], 3),
        f"engine_{n}_distinct_vs_peft_switching": round(distinct / tps["peft_switching_per_request"], 2),
        f"engine_{n}_distinct_vs_peft_mixed_batch": round(distinct / tps[f"peft_mixed_batch_{n}_adapters"], 2),
        "engine_one_adapter_vs_peft_one_adapter": round(tps["engine_one_adapter"] / tps["peft_one_adapter"], 2),
    }
    summary["target_keep_75pct_of_one_adapter"] = summary[f"engine_{n}_distinct_vs_one_adapter"] >= 0.75
    summary["target_4x_peft_switching"] = summary[f"engine_{n}_distinct_vs_peft_switching"] >= 4.0
    return {"results": results, "summary": summary}


def engine_name(src: str, gguf_dir: str | None, gguf_file: str) -> str:
    return f"{gguf_dir}/{gguf_file}" if gguf_dir else src


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_ALIASES))
    p.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--gguf-dir", default=None, help="directory holding a GGUF base model (loads it instead)")
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--switching-requests", type=int, default=None,
                   help="requests in the naive switching run (default: the batch size)")
    p.add_argument("--scale-batches", default="", help="comma-separated larger batches, each sample its own adapter")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    run_benchmark(a.device, a.dtype, a.base_model, a.gguf_dir, a.gguf_file, a.batch, a.adapters, a.new_tokens,
                  a.repeats, a.switching_requests, a.out,
                  tuple(int(b) for b in a.scale_batches.split(",") if b.strip()))


if __name__ == "__main__":
    main()
