"""Latent priors: the standard normal (ICM-LoRA) and the semantic prior of SG-LoRA.

SG-LoRA's prior for a new description lives in the CVAE's latent space. Each library task ("expert") is
summarised by the aggregate posterior of its snapshots, a Gaussian with mean m_e and variance v_e (law of
total variance over the snapshots' posteriors). The new description is compared by cosine similarity with
the experts' description embeddings; the top K get softmax(sim / temperature) weights w_e, and the prior is
the moment-matched mixture

    mu  = sum_e w_e m_e
    var = sum_e w_e v_e  +  sum_e w_e (m_e - mu)^2      (within-expert + spread of the expert means)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor | None = None,
                var_p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, var_p)) summed over the last axis: `(N, Z)` -> `(N,)`.

    Without `mu_p`/`var_p` the prior is the standard normal.
    """
    var_q = logvar_q.exp()
    if mu_p is None:
        return 0.5 * (var_q + mu_q.pow(2) - 1.0 - logvar_q).sum(-1)
    return 0.5 * (var_p.log() - logvar_q + (var_q + (mu_q - mu_p).pow(2)) / var_p - 1.0).sum(-1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@dataclass
class SemanticPrior:
    mean: torch.Tensor  # (N, Z)
    var: torch.Tensor  # (N, Z)
    weights: torch.Tensor  # (N, K) softmax weights of the chosen experts
    index: torch.Tensor  # (N, K) which experts


def semantic_weights(query: torch.Tensor, keys: torch.Tensor, top_k: int, temperature: float,
                     exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts by cosine similarity and their softmax weights: `(N, D)`, `(E, D)` -> `(N, k)`, `(N, k)`.

    `exclude` `(N,)` removes one expert per query (leave-one-out in training); -1 excludes none.
    """
    if top_k < 1 or temperature <= 0:
        raise ValueError(f"top_k must be >= 1 and temperature > 0, got {top_k} and {temperature}")
    sims = _unit(query) @ _unit(keys).T  # (N, E)
    k = min(top_k, keys.shape[0])
    if exclude is not None:
        rows = torch.arange(len(exclude), device=sims.device)[exclude >= 0]
        sims = sims.clone()
        sims[rows, exclude[exclude >= 0]] = float("-inf")
        k = min(top_k, keys.shape[0] - 1)
    if k < 1:
        raise ValueError("the semantic prior needs at least one expert besides the excluded one")
    top, idx = sims.topk(k, dim=-1)  # (N, k)
    return torch.softmax(top / temperature, dim=-1), idx


def semantic_prior(query: torch.Tensor, keys: torch.Tensor, means: torch.Tensor, variances: torch.Tensor,
                   top_k: int, temperature: float, exclude: torch.Tensor | None = None,
                   min_var: float = 1e-4) -> SemanticPrior:
    """The moment-matched mixture of the top-k experts' latent Gaussians (`(E, Z)` means and variances)."""
    w, idx = semantic_weights(query, keys, top_k, temperature, exclude)
    m = means[idx]  # (N, k, Z)
    mu = (w[..., None] * m).sum(1)  # (N, Z)
    within = (w[..., None] * variances[idx]).sum(1)  # (N, Z)
    between = (w[..., None] * (m - mu[:, None]).pow(2)).sum(1)  # (N, Z)
    return SemanticPrior(mu, (within + between).clamp_min(min_var), w, idx)


def expert_stats(mu: torch.Tensor, logvar: torch.Tensor, owner: torch.Tensor,
                 n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's aggregate posterior over its snapshots: `(S, Z)` posteriors, `(S,)` owners -> `(E, Z)` x 2.

    An expert is the equal-weight mixture of its snapshots' N(mu_s, var_s), moment-matched:
    m_e = mean_s mu_s and v_e = mean_s var_s + mean_s (mu_s - m_e)^2.
    """
    count = torch.zeros(n_experts, device=mu.device).index_add_(0, owner, torch.ones_like(owner, dtype=mu.dtype))
    if (count == 0).any():
        raise ValueError(f"expert(s) {torch.nonzero(count == 0).flatten().tolist()[:5]} have no snapshot")
    mean = torch.zeros(n_experts, mu.shape[1], device=mu.device).index_add_(0, owner, mu) / count[:, None]
    spread = (mu - mean[owner]).pow(2) + logvar.exp()  # (S, Z)
    var = torch.zeros_like(mean).index_add_(0, owner, spread) / count[:, None]
    return mean, var


@dataclass
class ExpertBank:
    """What SG needs at generation time: each library task's description embedding and latent Gaussian."""

    tasks: list[str]  # expert names, in row order
    emb: torch.Tensor  # (E, D) unit-norm mean description embedding of each expert
    mean: torch.Tensor  # (E, Z) aggregate-posterior mean
    var: torch.Tensor  # (E, Z) aggregate-posterior variance
    top_k: int = 5  # experts mixed into one prior
    temperature: float = 0.05  # softmax temperature over cosine similarities

    def __post_init__(self) -> None:
        e = len(self.tasks)
        if self.emb.shape[0] != e or self.mean.shape[0] != e or self.var.shape != self.mean.shape:
            raise ValueError(f"expert bank of {e} tasks has emb {tuple(self.emb.shape)}, mean "
                             f"{tuple(self.mean.shape)} and var {tuple(self.var.shape)}")
        if self.top_k < 1 or self.temperature <= 0:
            raise ValueError(f"top_k must be >= 1 and temperature > 0, got {self.top_k} and {self.temperature}")

    def to(self, device: torch.device | str) -> ExpertBank:
        return ExpertBank(self.tasks, self.emb.to(device), self.mean.to(device), self.var.to(device), self.top_k,
                          self.temperature)

    def prior(self, query: torch.Tensor, exclude: torch.Tensor | None = None) -> SemanticPrior:
        return semantic_prior(query, self.emb, self.mean, self.var, self.top_k, self.temperature, exclude)
