"""Advantage estimators: one value per sequence, computed under no-grad before the loss (sources and the choices
made where trainers differ: docs/losses.md#advantage-estimators).

Groups are segment reductions over explicit ``group_ids`` (any order, ragged sizes) or contiguous
``group_sizes``; nothing assumes a fixed G. Standard deviations are unbiased (Bessel, only when n > 1). Batch
statistics are local: cross-rank versions are the trainer's job (nothing here communicates).
"""
from __future__ import annotations

import math
from typing import Dict, Hashable, Optional, Sequence, Tuple

import torch

from . import checks

__all__ = [
    "group_normalized_advantages", "dr_grpo_advantages", "rloo_advantages", "bnpo_advantages", "ngrpo_advantages",
    "gpg_advantages", "psr_nsr_advantages", "empg_advantages", "normalize_then_sum", "dapo_overlong_penalty",
    "zero_variance_groups", "SPOTracker", "DCPOSmoothAdvantage",
]


def _rewards(rewards) -> torch.Tensor:
    checks.floating("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [n] (one scalar per sequence), got {checks._describe(rewards)}")
    return rewards


def _groups(n: int, group_ids, group_sizes, device) -> Tuple[torch.Tensor, int]:
    """Group index ``[n]`` in ``0..G-1`` and G, from ids (any order) or contiguous sizes."""
    if (group_ids is None) == (group_sizes is None):
        raise ValueError("pass exactly one of group_ids (one id per sequence) or group_sizes (contiguous groups)")
    if group_ids is not None:
        checks.integer("group_ids", group_ids)
        if tuple(group_ids.shape) != (n,):
            raise ValueError(f"group_ids must have shape ({n},) like rewards, got {checks._describe(group_ids)}")
        _, inv = torch.unique(group_ids, return_inverse=True)
        return inv.to(device), int(inv.max().item()) + 1 if n else 0
    sizes = torch.as_tensor(group_sizes, dtype=torch.long)
    if sizes.dim() != 1 or bool((sizes < 1).any()) or int(sizes.sum()) != n:
        raise ValueError(f"group_sizes must be positive and sum to len(rewards) = {n}, got {sizes.tolist()}")
    return torch.arange(sizes.numel()).repeat_interleave(sizes).to(device), sizes.numel()


class _Stats:
    """Segment count / mean / unbiased std over the non-NaN values of each group."""

    def __init__(self, x: torch.Tensor, g: torch.Tensor, num: int):
        ok = ~torch.isnan(x)
        v = torch.where(ok, x, torch.zeros_like(x))
        z = torch.zeros(num, dtype=x.dtype, device=x.device)
        self.count = z.index_add(0, g, ok.to(x.dtype))
        self.mean = z.index_add(0, g, v) / self.count.clamp(min=1)
        dev = torch.where(ok, x - self.mean[g], torch.zeros_like(x))
        ss = z.index_add(0, g, dev * dev)
        self.std = torch.sqrt(ss / (self.count - 1).clamp(min=1)) * (self.count > 1)


@torch.no_grad()
def group_normalized_advantages(rewards, group_ids=None, *, group_sizes=None, scale: str = "group",
                                eps: float = 1e-6, singleton: str = "reward") -> torch.Tensor:
    """GRPO (docs/losses.md#group-normalised-grpo): ``(R - mean_g) / (std + eps)``; ``scale`` =
    ``"group"`` (std per group), ``"batch"`` (std over the batch, mean per group: TRL ``scale_rewards="batch"``) or
    ``"none"`` (Dr.GRPO, docs/losses.md#group-mean-baseline-drgrpo).

    verl: ``eps=1e-6, singleton="reward"`` (a group of one gets mean 0, std 1, so ``A = R``). TRL:
    ``eps=1e-4, singleton="zero"``. NaN (unscorable) rewards are left out of every statistic and get ``A = 0``.
    """
    r = _rewards(rewards)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if singleton not in ("reward", "zero"):
        raise ValueError(f"singleton must be 'reward' or 'zero', got {singleton!r}")
    g, num = _groups(r.numel(), group_ids, group_sizes, r.device)
    st = _Stats(r, g, num)
    single = (st.count <= 1)[g]
    mean = torch.where(single & (singleton == "reward"), torch.zeros_like(r), st.mean[g])
    a = r - mean
    if scale == "group":
        std = torch.where(single & (singleton == "reward"), torch.ones_like(r), st.std[g])
        a = a / (std + eps)
    elif scale == "batch":
        a = a / (_Stats(r, torch.zeros_like(g), 1).std[0] + eps)
    if singleton == "zero":
        a = torch.where(single, torch.zeros_like(a), a)
    return torch.nan_to_num(a, nan=0.0)


def dr_grpo_advantages(rewards, group_ids=None, *, group_sizes=None, singleton: str = "reward") -> torch.Tensor:
    """Dr.GRPO (docs/losses.md#group-mean-baseline-drgrpo): ``R - mean_g``, no std."""
    return group_normalized_advantages(rewards, group_ids, group_sizes=group_sizes, scale="none",
                                       singleton=singleton)


@torch.no_grad()
def rloo_advantages(rewards, group_ids=None, *, group_sizes=None, singleton: str = "zero") -> torch.Tensor:
    """RLOO (docs/losses.md#rloo): ``R - mean of the others = n/(n-1) (R - mean_g)``. A group of one gets ``0``
    (``"zero"``) or ``R`` (``"reward"``, verl). The choice is explicit because the libraries differ."""
    r = _rewards(rewards)
    if singleton not in ("reward", "zero"):
        raise ValueError(f"singleton must be 'reward' or 'zero', got {singleton!r}")
    g, num = _groups(r.numel(), group_ids, group_sizes, r.device)
    st = _Stats(r, g, num)
    n = st.count[g]
    a = n / (n - 1).clamp(min=1) * (r - st.mean[g])
    return torch.where(n > 1, a, r if singleton == "reward" else torch.zeros_like(r))


@torch.no_grad()
def bnpo_advantages(rewards, group_ids=None, *, group_sizes=None,
                    reward_range: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """BNPO Beta normalisation (docs/losses.md#bnpo-beta-normalisation):
    ``clamp(1/f_Beta(p_g; alpha, beta), 0, 1e6) * (R~ - p_g)``.

    ``R~`` rescales rewards to [0, 1] with ``reward_range`` (default: the batch min and max; a constant batch
    gives ``R~ = 0``). ``p_g`` is the group mean of ``R~`` (0 for a group of one); alpha and beta are
    moment-matched to the distinct groups' ``p_g`` (one group: mean 0, variance 1).
    """
    r = _rewards(rewards)
    g, num = _groups(r.numel(), group_ids, group_sizes, r.device)
    lo, hi = reward_range if reward_range is not None else (r.min(), r.max())
    rt = (r - lo) / max(float(hi - lo), 1e-12)
    st = _Stats(rt, g, num)
    p = torch.where(st.count > 1, st.mean, torch.zeros_like(st.mean))
    if num > 1:
        mu, var = p.mean(), p.var(unbiased=True).clamp(min=1e-12)
    else:
        mu, var = torch.zeros((), dtype=r.dtype), torch.ones((), dtype=r.dtype)
    k = mu * (1 - mu) / var - 1
    alpha = torch.clamp(1 + k * mu / 3, min=1.0)
    beta = torch.clamp(1 + k * (1 - mu) / 3, min=1.0)
    log_beta_fn = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    log_f = torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_beta_fn
    scale = torch.exp(-log_f).clamp(0.0, 1e6)
    return scale[g] * (rt - p[g])


@torch.no_grad()
def ngrpo_advantages(rewards, group_ids=None, *, group_sizes=None, virtual_max: float = 1.0,
                     num_virtual: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """NGRPO (docs/losses.md#ngrpo-virtual-maximum-reward): statistics over each group plus ``num_virtual``
    copies of ``virtual_max``; ``(R - mean') / (std' + eps)``; a group of one gets mean 0, std 1."""
    r = _rewards(rewards)
    g, num = _groups(r.numel(), group_ids, group_sizes, r.device)
    z = torch.zeros(num, dtype=r.dtype, device=r.device)
    cnt = z.index_add(0, g, torch.ones_like(r))
    n = cnt + num_virtual
    s = z.index_add(0, g, r) + num_virtual * virtual_max
    mean = s / n
    ss = z.index_add(0, g, (r - mean[g]) ** 2) + num_virtual * (virtual_max - mean) ** 2
    std = torch.sqrt(ss / (n - 1).clamp(min=1))
    single = cnt <= 1
    mean, std = torch.where(single, torch.zeros_like(mean), mean), torch.where(single, torch.ones_like(std), std)
    return (r - mean[g]) / (std[g] + eps)


@torch.no_grad()
def gpg_advantages(rewards, group_ids=None, *, group_sizes=None, f_norm: float = 1.0,
                   alpha: Optional[float] = None) -> torch.Tensor:
    """GPG (docs/losses.md#gpg-scaling): ``alpha (R - mean_g) / f_norm`` with verl's
    ``alpha = B / max(count_nonzero(R), 1)``.
    [unconfirmed] the paper's ``B / (B - M)`` (M = zero-gradient samples) may be the intended alpha; pass it.
    A group of one uses mean 0 (verl)."""
    r = _rewards(rewards)
    g, num = _groups(r.numel(), group_ids, group_sizes, r.device)
    st = _Stats(r, g, num)
    a_coef = alpha if alpha is not None else r.numel() / max(int(torch.count_nonzero(r)), 1)
    mean = torch.where(st.count[g] > 1, st.mean[g], torch.zeros_like(r))
    return a_coef * (r - mean) / f_norm


@torch.no_grad()
def normalize_then_sum(rewards_per_func, group_ids=None, *, group_sizes=None, weights=None,
                       eps: float = 1e-4) -> torch.Tensor:
    """TRL ``multi_objective_aggregation="normalize_then_sum"`` (docs/losses.md#group-normalised-grpo): normalise
    each reward function per group (NaN-aware), take the weighted sum, normalise that over the batch. Rows where
    every function is NaN (unscorable) get 0."""
    checks.floating("rewards_per_func", rewards_per_func)
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be [n, K], got {checks._describe(rewards_per_func)}")
    n, k = rewards_per_func.shape
    g, num = _groups(n, group_ids, group_sizes, rewards_per_func.device)
    w = torch.ones(k, dtype=rewards_per_func.dtype) if weights is None else torch.as_tensor(
        weights, dtype=rewards_per_func.dtype)
    cols = []
    for j in range(k):
        st = _Stats(rewards_per_func[:, j], g, num)
        cols.append((rewards_per_func[:, j] - st.mean[g]) / (st.std[g] + eps))
    summed = (torch.stack(cols, 1) * w).nansum(1)
    summed[torch.isnan(rewards_per_func).all(1)] = float("nan")
    st = _Stats(summed, torch.zeros_like(g), 1)
    return torch.nan_to_num((summed - st.mean[0]) / (st.std[0] + eps), nan=0.0)


def dapo_overlong_penalty(lengths: torch.Tensor, max_length: int = 20480, buffer: int = 4096,
                          factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment (docs/losses.md#dapo), added to the reward:
    ``min(-(|o| - (L_max - L_buf)) / L_buf * f, 0)``
    (0 for short responses, down to ``-f`` at ``L_max``; the paper gives ``-f`` beyond ``L_max`` too)."""
    x = lengths.to(torch.float64) if not lengths.dtype.is_floating_point else lengths
    return (-(x - (max_length - buffer)) / buffer * factor).clamp(min=-factor, max=0.0)


@torch.no_grad()
def zero_variance_groups(rewards, group_ids=None, *, group_sizes=None) -> torch.Tensor:
    """DAPO dynamic sampling (docs/losses.md#dapo): a bool per sequence, True where its group's rewards are all
    equal (those groups carry no GRPO signal and are dropped upstream)."""
    r = _rewards(rewards)
    g, num = _groups(r.numel(), group_ids, group_sizes, r.device)
    z = torch.full((num,), float("inf"), dtype=r.dtype, device=r.device)
    lo = z.scatter_reduce(0, g, r, "amin")
    hi = (-z).scatter_reduce(0, g, r, "amax")
    return (lo == hi)[g]


def psr_nsr_advantages(rewards: torch.Tensor, mode: str, positive_weight: float = 0.1) -> torch.Tensor:
    """PSR / NSR / W-REINFORCE (docs/losses.md#psr-nsr-and-w-reinforce) from binary rewards: ``R``, ``R - 1``, or
    ``lambda`` / ``-1``."""
    if mode == "psr":
        return rewards.clone()
    if mode == "nsr":
        return rewards - 1.0
    if mode == "w_reinforce":
        return torch.where(rewards > 0, torch.full_like(rewards, positive_weight), torch.full_like(rewards, -1.0))
    raise ValueError(f"mode must be 'psr', 'nsr' or 'w_reinforce', got {mode!r}")


@torch.no_grad()
def empg_advantages(advantages, entropy, mask, seq_ids=None, step_ids=None, *, k: float = 1.0,
                    k_future: float = 1.0, zeta: float = 0.1) -> torch.Tensor:
    """EMPG (docs/losses.md#empg) [unconfirmed]: ``A_mod = g(H^_s) A + zeta f(H^_{s+1})`` on every token of
    step ``s``.

    A step is one assistant turn (``step_ids``, per token; default: the whole sequence). ``H_s`` is the step's
    mean entropy (old policy in the paper), min-max normalised over the batch's non-empty steps;
    ``g = exp(-k H^)/mean exp(-k H^)``, ``f = exp(-k_future H^_next)``. Decisions (unconfirmed upstream): the last
    step of a sequence gets no future term (``f = 0``), and no final re-normalisation of ``A_mod`` is applied.
    Inputs are ``[B, T]`` (rows are sequences) or flat ``[N]`` with ``seq_ids``.
    """
    shape = advantages.shape
    a, h, m = advantages.reshape(-1), entropy.reshape(-1).to(advantages.dtype), mask.reshape(-1).to(advantages.dtype)
    n = a.numel()
    if seq_ids is None:
        seq = torch.arange(shape[0], device=a.device).repeat_interleave(shape[1]) if len(shape) == 2 else \
            torch.zeros(n, dtype=torch.long, device=a.device)
    else:
        seq = seq_ids.reshape(-1).long()
    step = torch.zeros_like(seq) if step_ids is None else step_ids.reshape(-1).long()
    if n == 0:
        return advantages.clone()
    key = seq * (int(step.max()) - int(step.min()) + 1) + (step - step.min())
    uniq, inv = torch.unique(key, return_inverse=True)
    z = torch.zeros(uniq.numel(), dtype=a.dtype, device=a.device)
    cnt = z.index_add(0, inv, m)
    hs = z.index_add(0, inv, m * h) / cnt.clamp(min=1)
    ok = cnt > 0
    if not bool(ok.any()):
        return advantages.clone()
    lo, hi = hs[ok].min(), hs[ok].max()
    # empty steps (every token masked) take 0: their exp would overflow to inf and turn into NaN through 0 * inf
    hn = torch.where(ok, (hs - lo) / (hi - lo + 1e-8), torch.zeros_like(hs))
    gk = torch.exp(-k * hn)
    g = gk / gk[ok].mean()
    seq_of = torch.zeros(uniq.numel(), dtype=torch.long, device=a.device)
    seq_of = seq_of.scatter_reduce(0, inv, seq, "amax")
    nxt_same = torch.zeros_like(ok)
    nxt_same[:-1] = (seq_of[1:] == seq_of[:-1]) & ok[1:]
    f = torch.zeros_like(hn)
    f[:-1] = torch.exp(-k_future * hn[1:])
    f = f * nxt_same
    return (g[inv] * a + zeta * f[inv]).reshape(shape)


def _keys(prompt_ids) -> list:
    return prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)


class SPOTracker:
    """SPO Beta value tracker (docs/losses.md#spo-value-tracker): one response per prompt and a persistent
    ``(alpha, beta)`` per prompt.

    ``advantages(ids, rewards)`` -> ``R - alpha/(alpha+beta)`` standardised over the batch (unbiased std + 1e-8);
    ``update(ids, rewards, divergence)`` applies ``alpha <- rho alpha + R``, ``beta <- rho beta + (1 - R)`` with
    ``rho = clip(2^(-D/0.06), rho_min, rho_max)``. ``divergence=None`` means D = 0 (rho = rho_max). A prompt
    never initialised starts at ``alpha = beta = 0.5`` (the N_eff = 0 case).
    """

    def __init__(self, rho_min: float = 0.875, rho_max: float = 0.96, d_half: float = 0.06):
        self.rho_min, self.rho_max, self.d_half = rho_min, rho_max, d_half
        self.alpha: Dict[Hashable, float] = {}
        self.beta: Dict[Hashable, float] = {}

    def init_prompt(self, prompt_id: Hashable, scores: Sequence[float]) -> None:
        n_eff, s = len(scores), float(sum(scores))
        if n_eff == 0:
            self.alpha[prompt_id], self.beta[prompt_id] = 0.5, 0.5
            return
        n_init = 1.0 / (1.0 - self.rho_min)
        self.alpha[prompt_id] = n_init * (s + 0.5) / (n_eff + 1)
        self.beta[prompt_id] = n_init * (n_eff - s + 0.5) / (n_eff + 1)

    def baseline(self, prompt_ids) -> torch.Tensor:
        keys = _keys(prompt_ids)
        return torch.tensor([self.alpha.get(k, 0.5) / (self.alpha.get(k, 0.5) + self.beta.get(k, 0.5))
                             for k in keys], dtype=torch.float64)

    @torch.no_grad()
    def advantages(self, prompt_ids, rewards: torch.Tensor, standardize: bool = True) -> torch.Tensor:
        r = _rewards(rewards)
        a = r - self.baseline(prompt_ids).to(r)
        if standardize and a.numel() > 1:
            a = (a - a.mean()) / (a.std(unbiased=True) + 1e-8)
        return a

    def update(self, prompt_ids, rewards: torch.Tensor, divergence: Optional[torch.Tensor] = None) -> None:
        keys, rs = _keys(prompt_ids), _rewards(rewards).tolist()
        ds = [0.0] * len(keys) if divergence is None else torch.as_tensor(divergence).reshape(-1).tolist()
        for k, r, d in zip(keys, rs, ds):
            rho = min(max(2.0 ** (-d / self.d_half), self.rho_min), self.rho_max)
            self.alpha[k] = rho * self.alpha.get(k, 0.5) + r
            self.beta[k] = rho * self.beta.get(k, 0.5) + (1.0 - r)

    def state_dict(self) -> dict:
        return {"alpha": dict(self.alpha), "beta": dict(self.beta), "rho_min": self.rho_min,
                "rho_max": self.rho_max, "d_half": self.d_half}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.beta = dict(state["alpha"]), dict(state["beta"])
        self.rho_min, self.rho_max, self.d_half = state["rho_min"], state["rho_max"], state["d_half"]


class DCPOSmoothAdvantage:
    """DCPO smooth advantage standardisation (SAS, docs/losses.md#dcpo-smooth-advantage-standardisation), stateful
    per prompt.

    Each call sees the groups of a step (``prompt_ids``: one id per response; a prompt's responses form its
    group). Per prompt: merge the step's mean and unbiased std into running totals (each visit one unit),
    ``A_new = (R - mu_step)/sigma_step``, ``A_tot = (R - mu_tot)/sigma_tot`` (0 where sigma = 0, no eps), and
    return whichever of ``A_tot/i + (i-1)/i A_new`` and ``A_new/i + (i-1)/i A_tot`` has the smaller magnitude.
    """

    def __init__(self):
        self.state: Dict[Hashable, Tuple[int, float, float]] = {}  # id -> (visits i, mu_tot, var_tot)

    @torch.no_grad()
    def __call__(self, prompt_ids, rewards: torch.Tensor) -> torch.Tensor:
        r = _rewards(rewards)
        keys = _keys(prompt_ids)
        if len(keys) != r.numel():
            raise ValueError(f"prompt_ids must hold one id per reward ({r.numel()}), got {len(keys)}")
        out = torch.zeros_like(r)
        groups: Dict[Hashable, list] = {}
        for j, k in enumerate(keys):
            groups.setdefault(k, []).append(j)
        for k, idx in groups.items():
            x = r[idx].double()
            mu_s = float(x.mean())
            var_s = float(x.var(unbiased=True)) if x.numel() > 1 else 0.0
            i, mu_o, var_o = self.state.get(k, (0, 0.0, 0.0))
            i += 1
            mu_t = ((i - 1) * mu_o + mu_s) / i
            var_t = ((i - 1) * var_o + var_s + (i - 1) / i * (mu_s - mu_o) ** 2) / i
            self.state[k] = (i, mu_t, var_t)
            sd_s, sd_t = math.sqrt(var_s), math.sqrt(var_t)
            a_new = (x - mu_s) / sd_s if sd_s > 0 else torch.zeros_like(x)
            a_tot = (x - mu_t) / sd_t if sd_t > 0 else torch.zeros_like(x)
            sa1 = a_tot / i + (i - 1) / i * a_new
            sa2 = a_new / i + (i - 1) / i * a_tot
            out[idx] = torch.where(sa1.abs() <= sa2.abs(), sa1, sa2).to(r.dtype)
        return out

    def state_dict(self) -> dict:
        return {"state": dict(self.state)}

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state["state"])


# Estimators of the sibling modules, found here too. They import this module's helpers, so they load on first use.
_SIBLINGS = {"copo_advantages": "advantages_blend", "answer_entropy": "advantages_blend",
             "hpt_gate": "advantages_blend", "make_pairs": "pairs", "knapsack_group_sizes": "budget",
             "knapsack_value": "budget"}
__all__ += list(_SIBLINGS)


def __getattr__(name: str):
    if name in _SIBLINGS:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_SIBLINGS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
