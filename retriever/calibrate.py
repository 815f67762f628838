"""`hyperlora train strategy`: the description strategy's thresholds and train-task embeddings, fitted on
held-out paraphrases of the train tasks (never on dev tasks).

Each train task has ~200 paraphrased descriptions. The first `key_descriptions` (32) are what a library adapter of
the task is keyed by (retriever/keys.py) and what its train-task row is made of; the hypernetwork trained on the
first 32. The description projection (retriever/projection.py) fits on descriptions 32-99. Calibration queries are
taken from `CALIBRATION_SLICE` (descriptions 100-149); the strategy evaluation uses `EVALUATION_SLICE` (150-199), so
no number is reported on what it was fitted on.

What is fitted (every value a cosine score; see retriever/strategy.py for how each is used):
- `match_threshold`, `match_margin`: the grid point of the highest expected ROUGE-L, a retrieval scoring
  `quality_own` when right and `quality_other` when wrong, a generated adapter `quality_generated` (measured on train
  tasks: a task's own trained LoRA, another task's, a generated adapter), averaged over random libraries of several
  sizes (`library_fractions` of a half's tasks): how close a lacking task's paraphrase comes to some library task
  grows with the library's size, so one size only would misfit the others. The train tasks are cut into two halves
  that share no source dataset (`crossfit`): libraries are drawn from one half, and the tasks they lack come from
  the other, as a new task's source dataset is one the library never saw (the data card keeps every source on one
  side of the train/dev split). In each library, the queries whose task it holds and those whose task it lacks (any
  retrieval then wrong) weigh half each: no prior on either. The fit runs on raw cosines and on cosines after the
  description projection (fitted on the library's half only, so a lacking task is new to it too); the projection
  ships, with its fit, only if it gives the higher expected ROUGE-L;
- `instruction_threshold`, `instruction_margin`: a library adapter is also keyed by its instruction (a trained
  LoRA's is its task definition); over the train tasks' definitions (even-numbered tasks' adapters in the library,
  so their definition is an instruction key; odd-numbered ones' definitions describe tasks the library lacks), the
  grid point that keeps `instruction_recall` of the restated instructions with the fewest wrong matches (siblings
  of one dataset often share a near-identical definition), the lowest such threshold;
- `near_threshold`: the lowest score from which, among the queries not confidently matched, the query's own task is
  among the top-k library tasks that score at least that much `near_precision` of the time (a mixture of them and
  the generated adapter then often holds the right adapter);
- `scope_threshold`: between the train similarity of synthetic nonsense (random characters, punctuation, lists of
  nouns) and that of descriptions of tasks left out of the train set (their own rows excluded: held-out
  paraphrases and the tasks' definitions);
- `scope_floor` / `scope_reference`: the median train similarity of nonsense / of a train task's own paraphrase.
"""

from __future__ import annotations

import json
import logging
import os
import random
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from retriever.projection import DescriptionProjection, ProjectionConfig, fit_projection, source_folds, unit
from retriever.strategy import CALIBRATION_FILE, TRAIN_TASKS_FILE
from retriever.tasks import load_sni

logger = logging.getLogger(__name__)
CALIBRATION_SLICE = slice(100, 150)
FIT_END = 100  # the description projection fits on descriptions key_descriptions..99 (neither keys nor held out)
EVALUATION_SLICE = slice(150, 200)
NOUNS = ("apple chair river mountain pencil window orange tiger guitar bottle cloud hammer lemon rabbit piano "
         "garden ocean candle shoe mirror carpet horse spoon forest pizza rocket button coffee planet bridge "
         "tomato eagle blanket kettle violin cookie penguin ladder pillow castle").split()


@dataclass
class CalibrationConfig:
    """What `hyperlora train strategy` fits on."""

    sni_dir: str = "../shared/data/sni"  # SNI data (train split only is read)
    queries_per_task: int = 50  # held-out paraphrases per train task, from CALIBRATION_SLICE (1..50)
    key_descriptions: int = 32  # descriptions averaged into a task's key and train row (StrategyConfig's number)
    # expected ROUGE-L of each outcome, measured on train tasks (>= 0, own > generated > other): a task's own trained
    # LoRA ~52, a generated adapter ~21, another task's LoRA ~5; retrieving pays from (21-5)/(52-5) = 34% precision
    quality_own: float = 52.0
    quality_generated: float = 21.0
    quality_other: float = 5.0
    instruction_recall: float = 0.98  # restated instructions an instruction match must keep ((0, 1]): nearly all;
    #   what it loses are twins (two library tasks with one definition), whose adapters are near-interchangeable
    library_fractions: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5, 0.75)  # the match fit's simulated libraries hold
    #   these shares of the train tasks (each in (0, 1)): a deployment's library may be small or large
    library_draws: int = 2  # random libraries per share (>= 1)
    near_precision: float = 0.4  # a mixture must hold the query's own task this often ((0, 1])
    top_k: int = 3  # library tasks a mixture may hold (as StrategyConfig.top_k)
    scope_position: float = 1 / 3  # where scope_threshold sits between nonsense's 95th percentile (0) and unseen
    #   tasks' 0.5th (1), in [0, 1]; under 0.5 it leans towards never flagging a real task (a flag may become a 422)
    nonsense: int = 120  # synthetic nonsense strings (>= 10)
    definition_share: float = 0.5  # of a lacking task's weight in the match fit, the share on its definition (the
    #   rest on its paraphrases), in [0, 1): a new task may be described in a line or by a full definition
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)  # the description projection's fit
    #   (steps 0: none); it is kept only if it raises the match fit's expected quality over raw cosines
    limit: int | None = None  # at most this many train tasks (tests)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.queries_per_task <= 50:
            raise ValueError(f"queries_per_task={self.queries_per_task} (allowed: 1 to 50)")
        if self.key_descriptions < 1:
            raise ValueError(f"key_descriptions={self.key_descriptions} (must be >= 1)")
        if not 0 <= self.quality_other < self.quality_generated < self.quality_own:
            raise ValueError(f"quality_own={self.quality_own}, quality_generated={self.quality_generated}, "
                             f"quality_other={self.quality_other} (must be 0 <= other < generated < own)")
        for name in ("near_precision", "instruction_recall"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} (must be in (0, 1])")
        if not 0 <= self.definition_share < 1:
            raise ValueError(f"definition_share={self.definition_share} (must be in [0, 1))")
        if not 0 <= self.scope_position <= 1:
            raise ValueError(f"scope_position={self.scope_position} (must be in [0, 1])")
        if not self.library_fractions or not all(0 < f < 1 for f in self.library_fractions):
            raise ValueError(f"library_fractions={self.library_fractions} (must be a non-empty list of shares in "
                             "(0, 1))")
        if self.library_draws < 1:
            raise ValueError(f"library_draws={self.library_draws} (must be >= 1)")
        if self.nonsense < 10:
            raise ValueError(f"nonsense={self.nonsense} (must be >= 10)")


def nonsense_strings(n: int, seed: int = 0) -> list[str]:
    """Synthetic not-a-task strings: random letters, keyboard mash with symbols, punctuation, lists of nouns."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(" ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8)))
                                for _ in range(rng.randint(1, 5))))
        elif kind == 1:
            out.append("".join(rng.choices(string.ascii_letters + string.digits + "!@#$%^&*()", k=rng.randint(3, 20))))
        elif kind == 2:
            out.append(rng.choice(["...", "?", "!!", "-", "--", "n/a", "\u200b", "???", ".", "xx", "ok", "a"]))
        else:
            out.append(rng.choice(["; ", ", ", " "]).join(rng.sample(NOUNS, rng.randint(1, 4))))
    return out


@dataclass
class Embedded:
    """Everything calibration needs, embedded once."""

    tasks: list[str]
    keys: np.ndarray  # (n_tasks, dim): mean of each task's first key_descriptions descriptions
    definitions: np.ndarray  # (n_tasks, dim)
    queries: np.ndarray  # (n_queries, dim): held-out paraphrases
    owner: np.ndarray  # (n_queries,): task index of each query
    nonsense: np.ndarray  # (n_nonsense, dim)
    fit_queries: np.ndarray  # (n_fit, dim): the paraphrases between the key's and the held-out ones (FIT_SLICE)
    fit_owner: np.ndarray  # (n_fit,)
    sources: list[tuple[str, ...]]  # each task's source datasets (its name when it has none)


def embed_for_calibration(encoder, ccfg: CalibrationConfig) -> Embedded:
    sni = load_sni(ccfg.sni_dir, "train")
    tasks = sorted(sni)[: ccfg.limit] if ccfg.limit else sorted(sni)
    key_texts = [d for t in tasks for d in sni[t]["descriptions"][: ccfg.key_descriptions]]
    counts = [len(sni[t]["descriptions"][: ccfg.key_descriptions]) for t in tasks]
    held = [sni[t]["descriptions"][CALIBRATION_SLICE][: ccfg.queries_per_task] for t in tasks]
    fit = [sni[t]["descriptions"][ccfg.key_descriptions: FIT_END] if ccfg.projection.steps else [] for t in tasks]
    texts = key_texts + [sni[t]["definition"] for t in tasks] + [q for h in held for q in h] + \
        [q for f in fit for q in f]
    nonsense = nonsense_strings(ccfg.nonsense, ccfg.seed)
    logger.info("embedding %d texts of %d train tasks for calibration", len(texts) + len(nonsense), len(tasks))
    emb = encoder.encode([t[:1000] for t in texts] + nonsense, what="calibration text").cpu().numpy()
    bounds = np.cumsum([0] + counts)
    keys = unit(np.stack([emb[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]))
    n_keys, n = len(key_texts), len(tasks)
    owner = np.array([i for i, h in enumerate(held) for _ in h])
    end = n_keys + n + len(owner)
    fit_owner = np.array([i for i, f in enumerate(fit) for _ in f], np.int64)
    sources = [tuple(sorted(sni[t].get("source") or [t])) for t in tasks]
    return Embedded(tasks, keys, emb[n_keys: n_keys + n], emb[n_keys + n: end], owner, emb[len(texts):],
                    emb[end: len(texts)], fit_owner, sources)


def train_rows(e: Embedded) -> tuple[np.ndarray, list[str]]:
    """The shipped train-task rows: each task's description key and its definition, `(2 * n_tasks, dim)`."""
    return np.concatenate([e.keys, e.definitions]), e.tasks + e.tasks


def _best_two(scores: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best and second-best library score per query `(n_queries,)` each, odd tasks' own adapters left out."""
    s = scores.copy()
    s[owner % 2 == 1, owner[owner % 2 == 1]] = -np.inf
    top2 = -np.sort(-s, axis=1)[:, :2]
    return top2[:, 0], (top2[:, 1] if s.shape[1] > 1 else np.full(len(s), -1.0))


def even_half(n_tasks: int) -> np.ndarray:
    """The library of the instruction and near fits: the even-numbered tasks `(ceil(n_tasks / 2),)`."""
    return np.arange(0, n_tasks, 2)


def simulated_libraries(n_tasks: int, fractions: Sequence[float], draws: int, seed: int = 0) -> list[np.ndarray]:
    """Random libraries of train tasks, `draws` per fraction of the tasks (at least 2 and at most n_tasks - 1
    tasks each, so that some queries' tasks are in and some out): sorted task indices."""
    rng = np.random.default_rng(seed)
    sizes = [min(max(round(f * n_tasks), 2), n_tasks - 1) for f in fractions for _ in range(draws)]
    return [np.sort(rng.choice(n_tasks, k, replace=False)) for k in sizes] if n_tasks > 2 else [even_half(n_tasks)]


def _match_outcomes(scores: np.ndarray, owner: np.ndarray, library: np.ndarray, relative: np.ndarray | None = None,
                    raw: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """For one library (task indices): per query `(n_queries,)` its best and second-best library score, whether the
    best is its own task, its weight (half the mass on queries whose task the library holds, half on the rest, each
    half split in proportion to `relative`, default even) and, given `raw` (the scores before a projection), the
    best adapter's raw score (else +inf)."""
    s = scores[:, library]  # (n_queries, n_library)
    top2 = -np.sort(-s, axis=1)[:, :2]
    second = top2[:, 1] if s.shape[1] > 1 else np.full(len(s), -1.0)
    in_lib = np.isin(owner, library)
    top = s.argmax(1)
    right = library[top] == owner
    r = np.ones(len(s)) if relative is None else np.asarray(relative, np.float64)
    n_in, n_out = float(r[in_lib].sum()), float(r[~in_lib].sum())
    share = 0.5 if n_in and n_out else 1.0
    weight = np.where(in_lib, share * r / max(n_in, 1e-12), share * r / max(n_out, 1e-12))
    raw_best = np.full(len(s), np.inf) if raw is None else raw[:, library][np.arange(len(s)), top]
    return top2[:, 0], second, right, in_lib, weight, raw_best


def fit_match(scores: np.ndarray, owner: np.ndarray, quality: tuple[float, float, float],
              libraries: Sequence[np.ndarray] | None = None) -> tuple[float, float, dict]:
    """Grid search over (threshold, margin) on query x task scores `(n_queries, n_tasks)` for the highest expected
    quality, averaged over `libraries` (task-index arrays; default: the even-numbered tasks), each weighing the
    queries whose task it holds and those whose task it lacks equally; `quality`: (own adapter, generated,
    another task's adapter). A library's density sets how far a lacking task's queries reach into it, so a fit on
    one library size only would suit libraries of that size."""
    libraries = list(libraries) if libraries is not None else [even_half(scores.shape[1])]
    t, m, _, stats = fit_match_outcomes([_match_outcomes(scores, owner, lib) for lib in libraries], quality)
    return t, m, stats


def fit_match_outcomes(outcomes: Sequence[tuple[np.ndarray, ...]], quality: tuple[float, float, float]
                       ) -> tuple[float, float, float, dict]:
    """`fit_match` on precomputed `_match_outcomes`, one per simulated library: (threshold, margin, raw threshold,
    stats). The raw threshold (a projection's gate on the cosine before it) is searched only when the outcomes carry
    raw scores; else it is -1 (none)."""
    own, generated, other = quality
    gated = any(np.isfinite(o[5]).any() for o in outcomes)
    margins = np.arange(0.0, 0.11 if gated else 0.21, 0.01)
    raws = [-1.0] + list(np.round(np.arange(0.40, 0.91, 0.02), 2)) if gated else [-1.0]
    grid = [(float(t), float(m), float(g)) for t in np.round(np.arange(0.30, 1.0, 0.01), 2)
            for m in np.round(margins, 2) for g in raws]
    total = np.zeros(len(grid))
    for best, second, right, _, weight, raw_best in outcomes:
        gain = np.where(right, own - generated, other - generated) * weight  # (n_queries,) retrieving vs generating
        gap = best - second
        total += [gain[(best >= t) & (gap >= m) & (raw_best >= g)].sum() for t, m, g in grid]
    total /= len(outcomes)
    i = int(np.argmax(total))
    chosen, top = (grid[i], float(total[i])) if total[i] > 1e-9 else ((0.99, 0.2, -1.0), 0.0)
    hit = taken = held = 0.0
    for best, second, right, in_lib, weight, raw_best in outcomes:
        take = (best >= chosen[0]) & (best - second >= chosen[1]) & (raw_best >= chosen[2])
        hit, taken, held = hit + weight[right & take].sum(), taken + weight[take].sum(), held + weight[in_lib].sum()
    always = np.mean([(np.where(r, own - generated, other - generated) * w).sum() for _, _, r, _, w, _ in outcomes])
    stats = {"libraries": len(outcomes), "recall": round(float(hit / max(held, 1e-12)), 4),
             "precision": round(float(hit / taken) if taken else 1.0, 4),
             "expected_quality": round(generated + top, 2),
             "always_retrieve": round(generated + float(always), 2), "always_generate": generated}
    return chosen[0], chosen[1], chosen[2], stats


def fit_instruction(scores: np.ndarray, recall: float) -> tuple[float, float, dict]:
    """Grid search over (threshold, margin) on definition x definition scores `(n_tasks, n_tasks)`: even tasks'
    definitions are library instructions, each task's definition a query; fewest wrong matches at `recall`."""
    owner = np.arange(len(scores))
    in_lib = owner % 2 == 0
    best, second = _best_two(scores, owner)
    s = scores.copy()
    s[~in_lib, owner[~in_lib]] = -np.inf
    right = (s.argmax(1) == owner) & in_lib
    chosen, stats = (0.99, 0.0), {"recall": 0.0, "wrong_matches": 1.0}
    for thr in np.round(np.arange(0.40, 1.0, 0.01), 2):
        for margin in np.round(np.arange(0.0, 0.11, 0.01), 2):
            take = (best >= thr) & (best - second >= margin)
            r, wrong = (right & take).sum() / max(in_lib.sum(), 1), (take & ~right).sum() / len(take)
            if r >= recall and wrong < stats["wrong_matches"]:
                chosen, stats = (float(thr), float(margin)), {"recall": round(float(r), 4),
                                                              "wrong_matches": round(float(wrong), 4)}
    return chosen[0], chosen[1], stats


def fit_near(scores: np.ndarray, owner: np.ndarray, retrieved: np.ndarray, top_k: int, precision: float,
             library: np.ndarray) -> tuple[float, dict]:
    """The lowest score from which, among queries not confidently matched, the query's own task is among the
    top-k library tasks scoring at least that much `precision` of the time (a mixture then holds it). `library`:
    the library's task indices (columns of `scores`)."""
    local = np.argsort(-scores[:, library], axis=1)[:, :top_k]  # (n_queries, k)
    top, top_scores = library[local], np.take_along_axis(scores[:, library], local, 1)
    for thr in np.round(np.arange(0.40, 1.0, 0.01), 2):
        near = top_scores >= thr
        mixed = near.any(1) & ~retrieved
        if mixed.sum() < 5:
            break
        rate = ((top == owner[:, None]) & near).any(1)[mixed].mean()
        if rate >= precision:
            return float(thr), {"own_task_in_mixture": round(float(rate), 4),
                                "share_of_queries": round(float(mixed.mean()), 4)}
    return 1.0, {"own_task_in_mixture": 0.0, "share_of_queries": 0.0}


def leave_own_out(sims: np.ndarray, owner: np.ndarray, row_task: np.ndarray) -> np.ndarray:
    """Each query's best score over the rows of other tasks than its own: `(n_queries,)`."""
    s = np.where(row_task[None, :] == owner[:, None], -np.inf, sims)
    return s.max(1)


def _fit_half(e: Embedded, tasks: np.ndarray, ccfg: CalibrationConfig) -> DescriptionProjection | None:
    """The description projection fitted on `tasks` (sorted task indices) only."""
    mask = np.isin(e.fit_owner, tasks)
    if not mask.any():
        return None
    return fit_projection(e.keys[tasks], e.fit_queries[mask], np.searchsorted(tasks, e.fit_owner[mask]),
                          ccfg.projection)


def crossfit(e: Embedded, ccfg: CalibrationConfig, project: bool) -> tuple[list, tuple[np.ndarray, np.ndarray]]:
    """The match fit's simulated libraries, cross-fitted over two halves of the source datasets (`source_folds`):
    with `project`, the projection is fitted on one half's tasks; the libraries are drawn from that half, and the
    tasks they lack come from the other half, a source the projection never saw, as a new task's would (the data
    card's dev tasks share no source with a train task). A lacking task is asked for by its held-out paraphrases and
    by its definition, which together weigh `definition_share` (a held task's definition is an instruction match,
    not this fit's). Returns each library's `_match_outcomes` and, for the near fit, the first half's paraphrase
    scores with that half as the library."""
    a, b = source_folds(e.sources, ccfg.seed)
    halves = [(a, b), (b, a)] if len(a) and len(b) else [(np.arange(len(e.tasks)),) * 2]
    outcomes, first = [], None
    per_task = np.bincount(e.owner, minlength=len(e.tasks))
    raw_qs, raw_defs = e.queries @ e.keys.T, e.definitions @ e.keys.T  # as a library without a projection scores
    for own, other in halves:
        projection = _fit_half(e, own, ccfg) if project else None
        if projection is None:
            qs, defs, raw = raw_qs, raw_defs, None
        else:
            keys = projection(e.keys)
            qs, defs, raw = projection(e.queries) @ keys.T, projection(e.definitions) @ keys.T, raw_qs
        for pick in simulated_libraries(len(own), ccfg.library_fractions, ccfg.library_draws, ccfg.seed):
            lib = own[pick]
            rows = np.isin(e.owner, lib) | np.isin(e.owner, other)
            lacking = np.setdiff1d(other, lib)  # one half: libraries of all tasks lack the rest of them
            share = ccfg.definition_share
            relative = np.concatenate([np.where(np.isin(e.owner[rows], lib), 1.0, 1.0 - share),
                                       share * per_task[lacking]])
            outcomes.append(_match_outcomes(
                np.concatenate([qs[rows], defs[lacking]]), np.concatenate([e.owner[rows], lacking]), lib, relative,
                None if raw is None else np.concatenate([raw[rows], raw_defs[lacking]])))
        first = first or (qs, own)
    return outcomes, first


def fit(e: Embedded, ccfg: CalibrationConfig) -> tuple[dict, DescriptionProjection | None]:
    """The calibrated values, and the description projection when it beats raw cosines on the match fit."""
    rows, row_names = train_rows(e)
    row_task = np.array([e.tasks.index(n) for n in row_names])
    quality = (ccfg.quality_own, ccfg.quality_generated, ccfg.quality_other)
    fits = {}
    for kind in ("raw", "projected") if ccfg.projection.steps and len(e.fit_queries) else ("raw",):
        outcomes, first = crossfit(e, ccfg, kind == "projected")
        fits[kind] = fit_match_outcomes(outcomes, quality), first
        logger.info("match fit on %s scores: expected ROUGE-L %.2f", kind, fits[kind][0][3]["expected_quality"])
    kind = max(fits, key=lambda k: fits[k][0][3]["expected_quality"])
    (match_t, margin, raw_t, match_stats), (qs, library) = fits[kind]
    match_stats = {**match_stats, "scores": kind,
                   "expected_quality_by_scores": {k: v[0][3]["expected_quality"] for k, v in fits.items()}}
    top2 = -np.sort(-qs[:, library], axis=1)[:, :2]
    second = top2[:, 1] if len(library) > 1 else np.full(len(qs), -1.0)
    retrieved = (top2[:, 0] >= match_t) & (top2[:, 0] - second >= margin)
    near_t, near_stats = fit_near(qs, e.owner, retrieved, ccfg.top_k, ccfg.near_precision, library)
    instr_t, instr_margin, instr_stats = fit_instruction(e.definitions @ e.definitions.T, ccfg.instruction_recall)
    own_in = (e.queries @ rows.T).max(1)
    unseen = np.concatenate([leave_own_out(e.queries @ rows.T, e.owner, row_task),
                             leave_own_out(e.definitions @ rows.T, np.arange(len(e.tasks)), row_task)])
    junk = (e.nonsense @ rows.T).max(1)
    lo, hi = float(np.quantile(junk, 0.95)), float(np.quantile(unseen, 0.005))
    scope = lo + ccfg.scope_position * (hi - lo) if lo < hi else hi
    if lo >= hi:
        logger.warning("nonsense (95th percentile %.3f) and unseen tasks (0.5th percentile %.3f) overlap: the "
                       "out-of-scope threshold sits at the latter and lets some nonsense through", lo, hi)
    return {
        "match_threshold": round(match_t, 4), "match_margin": round(margin, 4), "raw_threshold": round(raw_t, 4),
        "near_threshold": round(max(near_t, 0.0), 4), "instruction_threshold": round(instr_t, 4),
        "instruction_margin": round(instr_margin, 4), "scope_threshold": round(scope, 4),
        "scope_floor": round(float(np.median(junk)), 4), "scope_reference": round(float(np.median(own_in)), 4),
        "stats": {
            "train_tasks": len(e.tasks), "queries": len(e.queries), "nonsense": len(e.nonsense),
            "match": match_stats, "near": near_stats, "instruction": instr_stats,
            "nonsense_similarity_q95": round(lo, 4), "unseen_task_similarity_q005": round(hi, 4),
            "unseen_flagged": round(float((unseen < scope).mean()), 4),
            "nonsense_flagged": round(float((junk < scope).mean()), 4),
            "own_task_similarity_median": round(float(np.median(own_in)), 4),
        },
        "config": asdict(ccfg),
    }, (fit_projection(e.keys, e.fit_queries, e.fit_owner, ccfg.projection) if kind == "projected" else None)


def write_calibration(e: Embedded, result: dict, embedder: str, out_json: Path = CALIBRATION_FILE,
                      out_rows: Path = TRAIN_TASKS_FILE, projection: DescriptionProjection | None = None,
                      projection_config: ProjectionConfig | None = None) -> tuple[Path, Path]:
    """Writes the train-task rows, the projection (next to the JSON, which names it; none: "projection": null) and
    the calibration JSON last, so a reader never sees a JSON naming a projection not yet written."""
    rows, names = train_rows(e)
    out_rows.parent.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": rows.astype(np.float16)}, str(out_rows),
              metadata={"tasks": json.dumps(names), "embedder": embedder,
                        "rows": "each train task's mean description key, then each task's definition"})
    os.chmod(out_rows, 0o644)  # safetensors writes 0600; the file ships with the package
    name = None
    if projection is not None:
        projection.embedder = embedder
        name = f"{out_json.stem}.projection.safetensors"
        projection.save(out_json.parent / name, projection_config)
    out_json.write_text(json.dumps({"embedder": embedder, **result, "projection": name}, indent=2) + "\n")
    return out_json, out_rows


def calibrate(encoder, ccfg: CalibrationConfig, out_json: Path = CALIBRATION_FILE,
              out_rows: Path = TRAIN_TASKS_FILE) -> dict:
    e = embed_for_calibration(encoder, ccfg)
    result, projection = fit(e, ccfg)
    write_calibration(e, result, encoder.name, out_json, out_rows, projection, ccfg.projection)
    return {**result, "projection": projection is not None}
