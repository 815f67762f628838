"""Decode benchmark of the static, graph-captured engine, side by side with what a user would pick instead.

Model-free: a random Llama of SmolLM2-135M's shapes built in code (no download, no tokenizer: prompts are
random token ids, sequences decode exactly `--new-tokens` tokens). Rows, each timed with the device
synchronised (tokens/s over wall time with prefill; ms/step over the decode steps alone):
  hf_static_compile_b32        transformers `generate`, static cache + torch.compile (auto), no adapter: the anchor
  peft_mixed_b32_32_adapters   transformers + PEFT mixed batch (`adapter_names=`), 32 rank-8 q/v adapters
  engine_dynamic_b32_32_adapters  our engine's DynamicCache loop (the CPU path), 32 distinct adapters
  engine_b32_base / _1_adapter / _32_adapters / _mix3   the static step at batch 32
  engine_b256_256_adapters     the static step at batch 256, every row its own adapter
  engine_compiled_b32_32_adapters  the static step through torch.compile before capture (`static.compile`)
and the greedy agreement of the static step with the dynamic engine on the same weights and adapters:
free-running (share of tokens equal) and teacher-forced (the static step fed the dynamic engine's tokens:
share of next-token choices equal), with the largest first-step logit difference.

Imports only torch, transformers, peft, `generator` and `serve.engine` (no Ray, FAISS, typer or FastAPI):
  PYTHONPATH=. python3 -m serve.bench_decode --device cuda --dtype bfloat16 --out results/bench_engine_cuda.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from generator.spec import ModelSpec
from serve.bench_engine import DTYPE_ALIASES, device_name, random_adapters, software_versions, write_report
from serve.engine import EngineConfig, GenerationJob, LLMEngine
from serve.metrics import Registry
from serve.static_step import StaticDecodeConfig

logger = logging.getLogger(__name__)

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY = dict(SMOLLM2_135M, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


class IdTokenizer:
    """Just enough tokenizer for decoding token ids without text (stop token 2, as SmolLM2's <|im_end|>)."""

    eos_token_id = pad_token_id = 2
    unk_token_id = 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return 2 if token == "<|im_end|>" else 0

    def convert_ids_to_tokens(self, i: int) -> str:
        return f"<{i}>"

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def random_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, spec): a random Llama with `shape`'s config; the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    return model, ModelSpec.from_hf_config(cfg, "random-smollm2-135m-shape")


def random_prompts(n: int, vocab: int, seed: int = 0, lo: int = 24, hi: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (t,), generator=g).tolist() for t in lengths]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.inference_mode()
def decode(engine: LLMEngine, jobs: list[GenerationJob]) -> dict:
    """Decode `jobs` in one batch without text: tokens, seconds (prefill included), ms per decode step."""
    dev = engine.device
    _sync(dev)
    t0 = time.perf_counter()
    batch = engine.new_batch(detokenize=False)
    batch.add(jobs)
    _sync(dev)
    t1, steps, tokens = time.perf_counter(), 0, 0
    while not batch.done:
        tokens += len(batch.step())
        steps += 1
    _sync(dev)
    t2 = time.perf_counter()
    batch.log_done()
    return {"tokens": tokens, "seconds": t2 - t0, "ms_per_step": 1e3 * (t2 - t1) / max(steps - 1, 1),
            "prefill_ms": 1e3 * (t1 - t0)}


def timed(fn: Callable[[], dict], cap_s: float, repeats: int) -> dict:
    """One warm-up call (graph capture, compilation), then up to `repeats` timed calls within `cap_s`; medians."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    runs, t0 = [], time.perf_counter()
    while len(runs) < repeats and (not runs or time.perf_counter() - t0 < cap_s):
        runs.append(fn())
    sec = statistics.median(r["seconds"] for r in runs)
    out = {"tokens": runs[0]["tokens"], "seconds": round(sec, 4), "tokens_per_s": round(runs[0]["tokens"] / sec, 1),
           "warmup_s": round(warm, 2), "runs": len(runs)}
    for key in ("ms_per_step", "prefill_ms"):
        if key in runs[0]:
            out[key] = round(statistics.median(r[key] for r in runs), 3)
    return out


def _distinct(i: int) -> tuple[tuple[str, float], ...]:
    return ((f"a{i % 32}", 1.0),)


def _jobs(prompts: list[list[int]], mix: Callable[[int], tuple], new_tokens: int) -> list[GenerationJob]:
    return [GenerationJob(p, mix(i), max_new_tokens=new_tokens, ignore_eos=True) for i, p in enumerate(prompts)]


def engine_rows(engine: LLMEngine, prompts32: list[list[int]], prompts256: list[list[int]], new_tokens: int,
                cap_s: float, repeats: int, prefix: str = "engine") -> dict[str, dict]:
    rows = {
        f"{prefix}_b32_base": (prompts32, lambda i: ()),
        f"{prefix}_b32_1_adapter": (prompts32, lambda i: (("a0", 1.0),)),
        f"{prefix}_b32_32_adapters": (prompts32, lambda i: ((f"a{i % 32}", 1.0),)),
        f"{prefix}_b32_mix3": (prompts32, lambda i: tuple((f"a{(i + j) % 32}", w) for j, w in enumerate((.5, .3, .2)))),
        f"{prefix}_b{len(prompts256)}_{len(prompts256)}_adapters": (prompts256, lambda i: ((f"a{i}", 1.0),)),
    }
    out = {}
    for name, (p, m) in rows.items():
        out[name] = guarded(name, lambda p=p, m=m: timed(lambda: decode(engine, _jobs(p, m, new_tokens)), cap_s,
                                                         repeats))
        print(f"  {name}: {out[name]}", flush=True)
    return out


def guarded(name: str, fn: Callable[[], dict]) -> dict:
    """`fn()`, or the error it raised: a failing row is reported and the others still run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        logger.exception("benchmark row %s failed", name)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {"error": f"{type(e).__name__}: {e}"}


@torch.inference_mode()
def agreement(static: LLMEngine, dynamic: LLMEngine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy agreement of the static step with the dynamic engine (32 distinct adapters)."""
    jobs = _jobs(prompts, lambda i: ((f"a{i % 32}", 1.0),), new_tokens)
    ref = [r.token_ids for r in dynamic.generate(jobs)]
    free = [r.token_ids for r in static.generate(jobs)]
    same = sum(a == b for x, y in zip(ref, free, strict=True) for a, b in zip(x, y, strict=True))
    batch = static.new_batch(detokenize=False)  # teacher-forced: feed the dynamic engine's tokens
    batch.add(jobs)
    st = static._static.step
    slots = sorted(batch.live)
    forced_same, total = 0, 0
    for t in range(new_tokens):
        own = st.tokens[slots].tolist()
        forced_same += sum(own[r] == ref[r][t] for r in range(len(slots)))
        total += len(slots)
        st.tokens[slots] = torch.tensor([ref[r][t] for r in range(len(slots))], device=st.device)
        batch.step()
    batch.log_done()
    n = sum(len(x) for x in ref)
    return {"free_running": round(same / n, 4), "teacher_forced": round(forced_same / total, 4),
            "sequences_identical": sum(x == y for x, y in zip(ref, free, strict=True)), "sequences": len(ref),
            "first_step_logits": _first_logits(static, dynamic, jobs)}


@torch.inference_mode()
def _first_logits(static: LLMEngine, dynamic: LLMEngine, jobs: list[GenerationJob]) -> dict:
    """Largest |logit difference| after one decode step, against the typical top-1 margin."""
    outs = []
    for eng in (dynamic, static):
        batch = eng.new_batch(detokenize=False)
        batch.add(jobs)
        batch.step()
        if hasattr(batch, "live"):
            logits = eng._static.step.logits[sorted(batch.live)].clone()
        else:
            logits = batch.logits.clone()
        while not batch.done:
            batch.step()
        batch.log_done()
        outs.append(logits.float())
    diff = (outs[0] - outs[1]).abs().amax(-1)  # (rows,)
    top2 = outs[0].topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    return {"max_abs_diff": round(float(diff.max()), 5), "median_top1_margin": round(float(margin.median()), 5),
            "logit_std": round(float(outs[0].std()), 4)}


def hf_numerics_rows(model, spec: ModelSpec, dev: torch.device, dtype: str, max_len: int, adapters,
                     dynamic: LLMEngine, prompts: list[list[int]], new_tokens: int, cap_s: float,
                     repeats: int) -> dict[str, dict]:
    """The static step rounding where HF rounds (numerics='hf'): its speed and agreement; and the dynamic engine
    against itself run as two half batches (how far HF's own bf16 tokens move with the batch shape)."""
    eng = build_engine(model, spec, dev, dtype, "static", 32, max_len, adapters, numerics="hf")
    mix = _distinct
    out = {"engine_hf_numerics_b32_32_adapters": timed(lambda: decode(eng, _jobs(prompts, mix, new_tokens)), cap_s,
                                                        repeats),
           "agreement_hf_numerics": agreement(eng, dynamic, prompts, new_tokens)}
    with torch.inference_mode():
        jobs = _jobs(prompts, mix, new_tokens)
        whole = [r.token_ids for r in dynamic.generate(jobs)]
        halves = [r.token_ids for h in (jobs[:16], jobs[16:]) for r in dynamic.generate(h)]
    same = sum(a == b for x, y in zip(whole, halves, strict=True) for a, b in zip(x, y, strict=True))
    out["agreement_dynamic_b32_vs_2x16"] = {"free_running": round(same / sum(map(len, whole)), 4),
                                            "sequences_identical": sum(x == y for x, y in zip(whole, halves,
                                                                                              strict=True))}
    eng._static = None
    return out


def model_prefill_rows(model, spec: ModelSpec, dev: torch.device, dtype: str, max_len: int, adapters,
                       prompts: list[list[int]], new_tokens: int, cap_s: float, repeats: int) -> dict[str, dict]:
    """Batch 32 with 32 distinct adapters, prefilled by the model's own HF forward (`static.prefill="model"`) instead
    of the static prefill: what the static prefill saves."""
    eng = build_engine(model, spec, dev, dtype, "static", 32, max_len, adapters, prefill="model")
    out = {"engine_model_prefill_b32_32_adapters": timed(lambda: decode(eng, _jobs(prompts, _distinct, new_tokens)),
                                                          cap_s, repeats)}
    eng._static = None
    return out


def compiled_rows(model, spec: ModelSpec, dev: torch.device, dtype: str, max_len: int, adapters,
                  dynamic: LLMEngine, prompts: list[list[int]], new_tokens: int, cap_s: float,
                  repeats: int) -> dict[str, dict]:
    """The static step through torch.compile (`static.compile`) before capture, batch 32 with 32 distinct
    adapters: its speed (compile time in the first run's warm-up) and its greedy agreement with the dynamic engine."""
    eng = build_engine(model, spec, dev, dtype, "static", 32, max_len, adapters, compile_step=True)
    t0 = time.perf_counter()
    with torch.inference_mode():  # compile and capture every shape the timed runs use
        eng.generate(_jobs(prompts, _distinct, new_tokens))
    out = {"engine_compiled_b32_32_adapters": timed(lambda: decode(eng, _jobs(prompts, _distinct, new_tokens)), cap_s,
                                                     repeats),
           "agreement_compiled": agreement(eng, dynamic, prompts, new_tokens)}
    out["engine_compiled_b32_32_adapters"]["compile_s"] = round(time.perf_counter() - t0, 1)
    eng._static = None
    return out


def _padded(prompts: list[list[int]], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), 2, dtype=torch.long)  # (batch, T), left-padded
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], mask[i, longest - len(p):] = torch.tensor(p), 1
    return ids.to(dev), mask.to(dev)


def hf_rows(shape: dict, dev: torch.device, dtype: torch.dtype, prompts: list[list[int]], adapters, new_tokens: int,
            peft_tokens: int, cap_s: float, repeats: int, compile_anchor: bool) -> dict[str, dict]:
    """transformers generate: static cache (+ torch.compile on CUDA) without adapters; PEFT mixed batch."""
    from peft import PeftModel

    from generator.peft_io import save_peft

    ids, mask = _padded(prompts, dev)
    model, _ = random_model(shape, dev, dtype)

    def gen(m, n: int, **kw) -> Callable[[], dict]:
        @torch.inference_mode()
        def go() -> dict:
            _sync(dev)
            t0 = time.perf_counter()
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=2, **kw)
            _sync(dev)
            return {"tokens": (out.shape[1] - ids.shape[1]) * out.shape[0], "seconds": time.perf_counter() - t0}

        return go

    out = {}
    anchor = {"cache_implementation": "static"} if compile_anchor else {}
    out["hf_static_compile_b32" if compile_anchor else "hf_eager_b32"] = timed(gen(model, new_tokens, **anchor),
                                                                               cap_s, repeats)
    tmp = Path(tempfile.mkdtemp(prefix="bench-peft-"))
    dirs = [save_peft(ad, tmp / f"a{i}") for i, ad in enumerate(adapters)]
    fresh, _ = random_model(shape, dev, dtype)
    peft = PeftModel.from_pretrained(fresh, str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        peft.load_adapter(str(d), adapter_name=f"a{i}")
    names = [f"a{i % len(adapters)}" for i in range(len(prompts))]
    out[f"peft_mixed_b32_{len(adapters)}_adapters"] = timed(gen(peft.eval(), peft_tokens, adapter_names=names),
                                                            cap_s, 1)
    return out


def build_engine(model, spec: ModelSpec, dev: torch.device, dtype: str, decode_mode: str, max_batch: int,
                 max_len: int, adapters, numerics: str = "fused", compile_step: bool = False,
                 prefill: str = "static") -> LLMEngine:
    static = StaticDecodeConfig(max_len=max_len, pool_slots=max_batch + 32, pool_rank=8, max_mix=3, numerics=numerics,
                                compile=compile_step, prefill=prefill)
    cfg = EngineConfig(max_batch_size=max_batch, max_prompt_tokens=max_len - 1, max_new_tokens=max_len, device=str(dev),
                       dtype=dtype, targets=("q_proj", "v_proj"), cache_bytes=8 << 30, decode=decode_mode,
                       static=static)
    engine = LLMEngine(model, IdTokenizer(), spec, cfg, Registry())
    for i, ad in enumerate(adapters):
        engine.add_adapter(f"a{i}", ad)
    return engine


def run(device: str, dtype: str, new_tokens: int, peft_tokens: int, repeats: int, cap_s: float, budget_s: float,
        tiny: bool, big_batch: int, out: str | None) -> dict:
    dtype = DTYPE_ALIASES[dtype]
    dev = torch.device(device)
    shape = TINY if tiny else SMOLLM2_135M
    t_start = time.perf_counter()
    model, spec = random_model(shape, dev, EngineConfig(dtype=dtype).torch_dtype)
    adapters = random_adapters(spec, max(32, big_batch))
    prompts = random_prompts(max(32, big_batch), shape["vocab_size"])
    p32, pbig = prompts[:32], prompts[:big_batch]
    max_len = 48 + new_tokens + 1
    static = build_engine(model, spec, dev, dtype, "static", max(32, big_batch), max_len, adapters)
    dynamic = build_engine(model, spec, dev, dtype, "dynamic", 32, max_len, adapters[:32])
    print(f"decode benchmark on {device} ({device_name(dev)}), {dtype}, {new_tokens} new tokens, random weights of "
          f"{'a tiny Llama' if tiny else 'SmolLM2-135M'}'s shape, rank-8 q/v adapters; CUDA graphs: "
          f"{static._static.step.use_graphs}", flush=True)
    results: dict[str, dict] = {}
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("engine", lambda: engine_rows(static, p32, pbig, new_tokens, cap_s, repeats)),
        ("agreement", lambda: {"agreement": agreement(static, dynamic, p32, new_tokens)}),
        ("model_prefill", lambda: model_prefill_rows(model, spec, dev, dtype, max_len, adapters[:32], p32, new_tokens,
                                                     cap_s, repeats)),
        ("compiled", lambda: compiled_rows(model, spec, dev, dtype, max_len, adapters[:32], dynamic, p32, new_tokens,
                                           cap_s, repeats)),
        ("hf_numerics", lambda: hf_numerics_rows(model, spec, dev, dtype, max_len, adapters[:32], dynamic, p32,
                                                 new_tokens, cap_s, repeats)),
        ("engine_dynamic", lambda: {"engine_dynamic_b32_32_adapters": timed(
            lambda: decode(dynamic, _jobs(p32, lambda i: ((f"a{i % 32}", 1.0),), new_tokens)), cap_s, 1)}),
        ("hf", lambda: hf_rows(shape, dev, static.cfg.torch_dtype, p32, adapters[:32], new_tokens, peft_tokens,
                               cap_s, repeats, compile_anchor=dev.type == "cuda")),
    ]
    for name, fn in steps:
        if time.perf_counter() - t_start > budget_s:
            results[name] = {"skipped": f"over the {budget_s:.0f} s budget"}
            continue
        got = guarded(name, fn)
        got = {name: got} if "error" in got else got
        results |= got
        if name != "engine":
            for k, v in got.items():
                print(f"  {k}: {v}", flush=True)
    report = {"results": results, "summary": summarise(results, big_batch),
              "setup": {"device": device, "device_name": device_name(dev), "dtype": dtype, "new_tokens": new_tokens,
                        "peft_new_tokens": peft_tokens, "model": "random weights, " + ("tiny" if tiny else
                                                                                    "SmolLM2-135M shape"),
                        "adapter_rank": 8, "targets": ["q_proj", "v_proj"], **software_versions(),
                        "total_s": round(time.perf_counter() - t_start, 1)}}
    print(table(results), flush=True)
    write_report(report, Path(out) if out else Path("results") / f"bench_engine_{dev.type}_static.json")
    return report


def summarise(results: dict[str, dict], big: int) -> dict:
    tps = {k: v.get("tokens_per_s") for k, v in results.items() if isinstance(v, dict)}
    out = {}
    d32, one = tps.get("engine_b32_32_adapters"), tps.get("engine_b32_1_adapter")
    if d32 and one:
        out["b32_distinct_vs_one_adapter"] = round(d32 / one, 3)
        out["target_b32_32_adapters_20k"] = d32 >= 20_000
        out["target_distinct_keeps_90pct"] = d32 / one >= 0.9
    if tps.get(f"engine_b{big}_{big}_adapters") and big == 256:
        out["target_b256_256_adapters_60k"] = tps["engine_b256_256_adapters"] >= 60_000
    if tps.get("engine_compiled_b32_32_adapters"):
        out["target_compiled_b32_32_adapters_20k"] = tps["engine_compiled_b32_32_adapters"] >= 20_000
    if d32 and tps.get("hf_static_compile_b32"):
        out["b32_32_adapters_vs_hf_static_compile"] = round(d32 / tps["hf_static_compile_b32"], 2)
    if d32 and tps.get("engine_dynamic_b32_32_adapters"):
        out["b32_32_adapters_vs_dynamic_engine"] = round(d32 / tps["engine_dynamic_b32_32_adapters"], 2)
    for name in ("agreement", "agreement_hf_numerics", "agreement_compiled"):
        if "teacher_forced" in results.get(name, {}):
            out[f"target_{name}_99pct"] = results[name]["teacher_forced"] >= 0.99
    return out


def table(results: dict[str, dict]) -> str:
    lines = [f"{'row':<38} {'tokens/s':>10} {'ms/step':>8} {'prefill ms':>10} {'warmup s':>9}"]
    for k, v in results.items():
        if "tokens_per_s" in v:
            lines.append(f"{k:<38} {v['tokens_per_s']:>10.0f} {v.get('ms_per_step', float('nan')):>8.2f} "
                         f"{v.get('prefill_ms', float('nan')):>10.2f} {v['warmup_s']:>9.1f}")
        elif k.startswith("agreement") and "teacher_forced" in v:
            lines.append(f"{k + ' (teacher-forced)':<34} {v['teacher_forced']:>10.4f}   "
                         f"free-running {v['free_running']:.4f}, {v['sequences_identical']}/{v['sequences']} identical")
        else:
            lines.append(f"{k:<34} {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_ALIASES))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--peft-new-tokens", type=int, default=8, help="PEFT's mixed batch is slow: fewer tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median), within --row-cap-s")
    p.add_argument("--row-cap-s", type=float, default=20.0, help="stop repeating a row after this many seconds")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip the remaining rows after this many seconds")
    p.add_argument("--big-batch", type=int, default=256, help="the large batch, every row its own adapter")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M's shape (smoke)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run(a.device, a.dtype, a.new_tokens, a.peft_new_tokens, a.repeats, a.row_cap_s, a.budget_s, a.tiny, a.big_batch,
        a.out)


if __name__ == "__main__":
    main()
