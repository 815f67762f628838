"""The best adapter for a description: the library's, a generated one, or a mixture, decided in one place.

A description is embedded once. Its nearest library adapters are found by their *description* keys (a second
`Router` over the same library with `key_mode="description"`, scored after the description projection that the
calibration file names, when it names one: retriever/projection.py) and by their *instructions* (a third, with
`key_mode="instruction"`: the instruction a library adapter was trained or made for, e.g. a trained LoRA's task
definition, which its paraphrased descriptions need not contain), and its distance to the tasks the hypernetwork
was trained on is measured against a compact set of train-task embeddings shipped with the package
(`data/train_tasks.safetensors`). A registered `Strategy` turns those numbers into a `Plan`:

- `retrieve`: the library adapter whose instruction the description restates (an instruction match: score >=
  `instruction_threshold`, ahead of the second instruction by `instruction_margin`), else the top library adapter
  by descriptions, whatever its score;
- `generate`: a generated adapter, whatever the library holds;
- `auto`: the adapter of an instruction match; else the library adapter when one task is a confident match by its
  descriptions (score >= `match_threshold` and ahead of the second by `match_margin`; with a projection, also a
  cosine before it >= `raw_threshold`), a mixture of the generated
  adapter and the near library adapters when some are close (score >= `near_threshold`), and the generated adapter
  when nothing is.

The thresholds come from `data/strategy_calibration.json`, which `hyperlora train strategy` writes from held-out
paraphrases and the definitions of the train tasks (retriever/calibrate.py); dev tasks are never used. Every
decision carries a `confidence` in [0, 1] for the generated case (0: as far from the training tasks as nonsense,
1: as close as a training task's own paraphrase), and descriptions that are closer to nothing than
`scope_threshold` are flagged out of scope with a warning (a deployment may refuse them: `reject_below`).
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load_file

from generator.lora import LoraAdapter
from generator.registry import registrar
from retriever.compose import fuse
from retriever.config import RetrieverConfig
from retriever.library import AdapterLibrary
from retriever.projection import DescriptionProjection
from retriever.router import Route, Router, softmax
from retriever.strategy_config import (  # noqa: F401 - re-exported
    OVERRIDABLE,
    STRATEGY_NAMES,
    StrategyConfig,
    StrategyName,
    _number,
    key_configs,
)

logger = logging.getLogger(__name__)
DATA_DIR = Path(__file__).parent / "data"
CALIBRATION_FILE = DATA_DIR / "strategy_calibration.json"
TRAIN_TASKS_FILE = DATA_DIR / "train_tasks.safetensors"
PathTaken = Literal["generate", "retrieve", "mix"]
THRESHOLDS = ("match_threshold", "match_margin", "near_threshold", "instruction_threshold", "instruction_margin",
              "scope_threshold", "scope_floor", "scope_reference")
STRATEGIES: dict[str, type[Strategy]] = {}
register_strategy = registrar(STRATEGIES)


@dataclass
class Thresholds:
    """The calibrated numbers (cosine scores); see retriever/calibrate.py for how each is fitted."""

    match_threshold: float = 0.80
    match_margin: float = 0.05
    near_threshold: float = 0.65
    instruction_threshold: float = 0.97  # a description this close to one adapter's instruction restates it ...
    instruction_margin: float = 0.02  # ... when it leads the second instruction by at least this much
    scope_threshold: float = 0.33  # max(train similarity, best library score) under this: out of scope
    scope_floor: float = 0.20  # confidence 0: the typical train similarity of nonsense
    scope_reference: float = 0.80  # confidence 1: the typical train similarity of a train task's own paraphrase
    raw_threshold: float = -1.0  # with a projection, a confident match also needs this cosine before it (-1: none)
    projection: str | None = None  # the description projection the match scores were fitted under (a path; None:
    #                                raw cosines), named by the calibration file (retriever/projection.py)

    @classmethod
    def load(cls, cfg: StrategyConfig) -> Thresholds:
        path = Path(cfg.calibration) if cfg.calibration else CALIBRATION_FILE
        raw = json.loads(path.read_text())
        missing = [k for k in THRESHOLDS if not _number(raw.get(k))]
        if missing:
            raise ValueError(f"{path.name} lacks numeric {missing}; rerun `hyperlora train strategy`")
        name = raw.get("projection")
        if name is not None and not (path.parent / str(name)).is_file():
            raise ValueError(f"{path.name} names the description projection {name!r}, which is not beside it; rerun "
                             "`hyperlora train strategy`")
        gate = raw.get("raw_threshold", -1.0)
        if not _number(gate):
            raise ValueError(f"{path.name} has a non-numeric raw_threshold {gate!r}; rerun `hyperlora train strategy`")
        t = cls(**{k: float(raw[k]) for k in THRESHOLDS}, raw_threshold=float(gate),
                projection=str(path.parent / name) if name else None)
        fitted = raw.get("config", {}).get("key_descriptions")
        if fitted is not None and fitted != cfg.key_descriptions:
            logger.warning("%s was fitted on keys of %s descriptions, the strategy keys adapters by %d: rerun "
                           "`hyperlora train strategy` for calibrated thresholds", path.name, fitted,
                           cfg.key_descriptions)
        overrides = {k: getattr(cfg, k) for k in OVERRIDABLE if getattr(cfg, k) is not None}
        return replace(t, **overrides)

    def confidence(self, similarity: float) -> float:
        """Train similarity -> [0, 1]: 0 at the nonsense level (`scope_floor`), 1 at `scope_reference`."""
        span = max(self.scope_reference - self.scope_floor, 1e-6)
        return float(min(1.0, max(0.0, (similarity - self.scope_floor) / span)))


@dataclass
class Match:
    """A library adapter near the description."""

    id: str
    name: str
    similarity: float  # cosine of the description to the adapter's key
    key: str = "descriptions"  # which key: "descriptions" (their mean) or "instruction" (an instruction match)


@dataclass
class Decision:
    """What one description gets, and why."""

    strategy: str  # the strategy asked for: generate | retrieve | auto
    path: PathTaken  # what it did: the library adapter, a generated one, or a mixture of both
    matches: list[Match]  # the nearest library adapters, best first
    mixture: list[tuple[str | None, float]]  # (library id, or None for the generated adapter; weight), sums to 1
    confidence: float  # [0, 1], how close the description is to the tasks the generator was trained on
    train_similarity: float  # its cosine to the nearest train task (what `confidence` is made from)
    nearest_train_task: str  # that task's name
    out_of_scope: bool  # close to no train task and no library adapter: probably not a task description
    warning: str | None = None  # set when out of scope
    rejected: bool = False  # out of scope with confidence under the config's `reject_below`
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def needs_generation(self) -> bool:
        return any(i is None for i, _ in self.mixture)

    @property
    def library_id(self) -> str | None:
        """The library adapter returned as is (path `retrieve`)."""
        return self.mixture[0][0] if self.path == "retrieve" else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mixture"] = [{"id": i, "weight": w} for i, w in self.mixture]
        return d


@dataclass
class Plan:
    path: PathTaken
    mixture: list[tuple[str | None, float]]
    by_instruction: bool = False  # retrieved because the description restates the adapter's instruction


class Strategy(ABC):
    """Matches and thresholds -> which adapters, with what weights."""

    name = ""

    def __init__(self, cfg: StrategyConfig, thresholds: Thresholds) -> None:
        self.cfg, self.t = cfg, thresholds

    @abstractmethod
    def plan(self, route: Route, instruction: Route) -> Plan:
        """`route`: the library adapters nearest by descriptions; `instruction`: by instructions (best two)."""

    def instruction_match(self, instruction: Route) -> str | None:
        """The adapter whose instruction the description restates, if one does (see `Thresholds`)."""
        s = instruction.scores
        if s and s[0] >= self.t.instruction_threshold and \
                s[0] - (s[1] if len(s) > 1 else -1.0) >= self.t.instruction_margin:
            return instruction.ids[0]
        return None


@register_strategy("generate")
class Generate(Strategy):
    """Always the generated adapter."""

    def plan(self, route, instruction):
        return Plan("generate", [(None, 1.0)])


@register_strategy("retrieve")
class Retrieve(Strategy):
    """Always a library adapter (an instruction match, else the top by descriptions); generated only when the
    library is empty."""

    def plan(self, route, instruction):
        restated = self.instruction_match(instruction)
        if restated:
            return Plan("retrieve", [(restated, 1.0)], by_instruction=True)
        if not route.ids:
            return Plan("generate", [(None, 1.0)])
        return Plan("retrieve", [(route.ids[0], 1.0)])


@register_strategy("auto")
class Auto(Strategy):
    """An instruction match's adapter; else the library adapter on a confident single match, a mixture when some
    are near, else the generated one."""

    def plan(self, route, instruction):
        restated = self.instruction_match(instruction)
        if restated:
            return Plan("retrieve", [(restated, 1.0)], by_instruction=True)
        scores = route.scores
        if scores and scores[0] >= self.t.match_threshold and \
                scores[0] - (scores[1] if len(scores) > 1 else -1.0) >= self.t.match_margin and \
                (route.raw_scores is None or route.raw_scores[0] >= self.t.raw_threshold):
            return Plan("retrieve", [(route.ids[0], 1.0)])
        near = [(i, s) for i, s in zip(route.ids, scores, strict=True) if s >= self.t.near_threshold]
        if not near:
            return Plan("generate", [(None, 1.0)])
        g = self.cfg.mix_generated_weight
        w = softmax(np.array([s for _, s in near], np.float64), self.cfg.temperature)
        return Plan("mix", [(None, g)] + [(i, float((1 - g) * x)) for (i, _), x in zip(near, w, strict=True)])


class TrainTasks:
    """The training tasks' description embeddings, one or more unit rows per task: `(n_rows, dim)`."""

    def __init__(self, vectors: np.ndarray, tasks: Sequence[str], embedder: str = "") -> None:
        if vectors.ndim != 2 or len(vectors) != len(tasks) or not len(tasks):
            raise ValueError(f"train-task embeddings of shape {vectors.shape} for {len(tasks)} task rows")
        self.vectors = np.ascontiguousarray(vectors, np.float32)  # (n_rows, dim)
        self.tasks, self.embedder = list(tasks), embedder

    @classmethod
    def load(cls, path: str | Path | None = None) -> TrainTasks:
        path = Path(path) if path else TRAIN_TASKS_FILE
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        return cls(tensors["vectors"].astype(np.float32), json.loads(meta["tasks"]), meta.get("embedder", ""))

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """queries `(n, dim)` -> best cosine `(n,)` and the nearest task of each."""
        sims = queries @ self.vectors.T  # (n, n_rows)
        best = sims.argmax(1)
        return sims[np.arange(len(queries)), best], [self.tasks[i] for i in best]


class DescriptionStrategy:
    """The one place a description's adapter is decided: embed once, search, apply a registered `Strategy`."""

    def __init__(self, library: AdapterLibrary, encoder, cfg: StrategyConfig | None = None,
                 retriever: RetrieverConfig | None = None, train_tasks: TrainTasks | None = None,
                 thresholds: Thresholds | None = None) -> None:
        self.cfg = cfg or StrategyConfig()
        self.encoder = encoder
        self.thresholds = thresholds or Thresholds.load(self.cfg)
        projection = DescriptionProjection.load(self.thresholds.projection) if self.thresholds.projection else None
        if projection is not None and projection.dim != encoder.dim:
            raise ValueError(f"the description projection is {projection.dim}-d but the encoder gives {encoder.dim}-d "
                             "vectors: rerun `hyperlora train strategy` with this embedder")
        by_descriptions, by_instructions = key_configs(retriever or RetrieverConfig(), self.cfg.key_descriptions)
        self.router = Router(library, encoder, by_descriptions, projection=projection)
        self.instructions = Router(library, encoder, by_instructions)
        self.train = train_tasks or TrainTasks.load(self.cfg.train_tasks)
        if self.train.vectors.shape[1] != encoder.dim:
            raise ValueError(f"train-task embeddings are {self.train.vectors.shape[1]}-d but the encoder gives "
                             f"{encoder.dim}-d vectors: rerun `hyperlora train strategy` with this embedder")

    @property
    def library(self) -> AdapterLibrary:
        return self.router.library

    def embed(self, descriptions: Sequence[str]) -> np.ndarray:
        """`(n, dim)` unit vectors, one batched encoder call (the generator may reuse them)."""
        return self.router.embed(descriptions)

    def decide(self, descriptions: Sequence[str], strategy: str | None = None) -> tuple[list[Decision], np.ndarray]:
        """Each description's decision, and the embeddings `(n, dim)` it was made from."""
        t0 = time.perf_counter()
        queries = self.embed(descriptions)
        t1 = time.perf_counter()
        decisions = self.decide_vectors(queries, strategy)
        ms = {"embed_ms": 1e3 * (t1 - t0), "decide_ms": 1e3 * (time.perf_counter() - t1)}
        for d in decisions:
            d.timings = ms
        logger.info("decided %d description(s) in %.1f ms (embed %.1f): %s", len(decisions), sum(ms.values()),
                    ms["embed_ms"], ", ".join(d.path for d in decisions))
        return decisions, queries

    def decide_vectors(self, queries: np.ndarray, strategy: str | None = None,
                       exclude: Sequence[set[str]] | None = None) -> list[Decision]:
        """Decisions for already-embedded descriptions `(n, dim)`; `exclude[i]`: library ids query i may not get."""
        name = strategy or self.cfg.strategy
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose from {list(STRATEGY_NAMES)}")
        chooser = STRATEGIES[name](self.cfg, self.thresholds)
        self.router.refresh()
        self.instructions.refresh()
        routes = self.router.route_vectors(queries, self.cfg.top_k, exclude)
        restated = self.instructions.route_vectors(queries, 2, exclude)
        train_sim, nearest = self.train.nearest(queries)
        return [self._decision(name, chooser.plan(r, i), r, i, float(s), n)
                for r, i, s, n in zip(routes, restated, train_sim, nearest, strict=True)]

    def _matches(self, plan: Plan, route: Route, instruction: Route) -> list[Match]:
        """The nearest adapters by descriptions, best first; an instruction match, when retrieved, leads."""
        matches = [Match(i, n, round(float(s), 6)) for i, n, s in zip(route.ids, route.names, route.scores,
                                                                         strict=True)]
        if plan.by_instruction:
            first = Match(instruction.ids[0], instruction.names[0], round(float(instruction.scores[0]), 6),
                          "instruction")
            matches = [first] + [m for m in matches if m.id != first.id][: self.cfg.top_k - 1]
        return matches

    def _decision(self, name: str, plan: Plan, route: Route, instruction: Route, train_sim: float,
                  nearest: str) -> Decision:
        t = self.thresholds
        matches = self._matches(plan, route, instruction)
        best_library = max([m.similarity for m in matches], default=-1.0)
        confidence = t.confidence(train_sim)
        oos = max(train_sim, best_library) < t.scope_threshold
        warning = None
        if oos:
            warning = (f"this description is far from every task the generator was trained on (similarity "
                       f"{train_sim:.2f}, out-of-scope threshold {t.scope_threshold:.2f}) and from every library "
                       "adapter: it may not describe a task, and the adapter is probably not useful")
        rejected = oos and self.cfg.reject_below is not None and confidence < self.cfg.reject_below
        return Decision(name, plan.path, matches, plan.mixture, round(confidence, 4), round(train_sim, 6), nearest,
                        oos, warning, rejected)

    def instruction(self, decision: Decision, adapter: LoraAdapter | None) -> str | None:
        """The instruction the decided adapter carries, which serving puts in front of the user's text
        (serve/instructions.py): on the `retrieve` path the library record's (the adapter is used by id; a trained
        LoRA's is its task definition), else the `build` result's `metadata["instruction"]`: a generated adapter's
        is its description, and a mixture carries the generated adapter's (see `build`)."""
        if decision.path == "retrieve":
            return self.library.get(decision.library_id).instruction
        return adapter.metadata.get("instruction") if adapter is not None else None

    def build(self, decision: Decision, generated: LoraAdapter | None,
              load: Callable[[str], LoraAdapter] | None = None) -> LoraAdapter | None:
        """The decision's adapter: None for `retrieve` (the library adapter is used by id), the generated one,
        or the exact weighted mixture (`fuse(..., "concat")`: rank = the sum of the ranks)."""
        if decision.path == "retrieve":
            return None
        if generated is None:
            raise ValueError(f"the {decision.path} path needs the generated adapter")
        if decision.path == "generate":
            return generated
        load = load or self.library.load
        parts = [generated if i is None else load(i) for i, _ in decision.mixture]
        mixed = fuse(parts, [w for _, w in decision.mixture], "concat")
        mixed.metadata.update({k: v for k, v in generated.metadata.items() if k in ("description", "instruction")})
        mixed.metadata["fused_from"] = ",".join(i or "generated" for i, _ in decision.mixture)
        return mixed
