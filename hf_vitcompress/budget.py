"""Parameter budgets and rank allocation, shared by every factorizing method.

A *candidate* is one linear that may become a rank-k factor pair. Its cost at rank k is
``k·(in+out)`` weights; above the break-even rank it stays dense (``in·out`` weights). Biases and
every untouched module are fixed costs. The allocator picks one rank (or dense) per layer so that
the whole model's parameter count is at most ``ratio × dense`` and as close to it as one rank step
allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .layers import break_even_rank

DENSE = None  # allocation value meaning "keep this layer dense"
SHARED = "shared"  # allocation value of a layer whose weights a JointCandidate chosen in its place holds


class BudgetError(ValueError):
    """The requested budget cannot be met (or is not a budget)."""


@dataclass
class RankCandidate:
    """One compressible linear and the error it would have at each rank.

    ``errors[k]`` is the error kept at rank ``k`` (``errors[0]`` = everything discarded), on whatever
    scale the method chose; the allocator only compares errors across layers.
    """

    name: str
    in_features: int
    out_features: int
    errors: torch.Tensor
    # For things that are not one plain linear (e.g. one attention head's Q·Kᵀ product): the weights
    # each rank costs, the weights it owns in the dense model, and the highest useful rank.
    unit_cost: int | None = None
    dense_parameters: int | None = None
    full_rank: int | None = None

    @property
    def max_rank(self) -> int:
        limit = self.full_rank if self.full_rank is not None else break_even_rank(self.in_features, self.out_features)
        return min(limit, len(self.errors) - 1)

    @property
    def rank_cost(self) -> int:
        return self.unit_cost if self.unit_cost is not None else self.in_features + self.out_features

    @property
    def dense_cost(self) -> int:
        return self.dense_parameters if self.dense_parameters is not None else self.in_features * self.out_features

    def cost(self, rank: int | str | None) -> int:
        if rank == SHARED:
            return 0  # paid by the joint candidate
        return self.dense_cost if rank is DENSE else rank * self.rank_cost

    def error(self, rank: int | None) -> float:
        return 0.0 if rank is DENSE else float(self.errors[rank])


@dataclass
class JointCandidate:
    """Another way to spend weights on several candidates' matrices at once (q, k and v factorized together,
    one shared down-projection): ``candidate`` is the stacked matrix's factorization, in the same error units
    as the ``members`` it stands for. :func:`allocate_global` picks, per joint candidate, either it at some
    rank (its members then get :data:`SHARED`) or the members each their own rank; it never keeps it dense
    (that is the members kept dense)."""

    candidate: RankCandidate
    members: tuple[str, ...]


@dataclass
class ParameterBudget:
    """How many weights the candidates may use so that the whole model lands on ``ratio``."""

    dense_parameters: int
    fixed_parameters: int  # everything the allocator does not decide (other modules, biases)
    target_parameters: int

    @property
    def candidate_budget(self) -> int:
        return self.target_parameters - self.fixed_parameters


def make_budget(dense_parameters: int, candidates: Sequence[RankCandidate], ratio: float) -> ParameterBudget:
    """The budget for ``ratio`` of ``dense_parameters``, or a :class:`BudgetError` naming the reachable range."""
    if not 0.0 < ratio <= 1.0:
        raise BudgetError(f"target_param_ratio must be in (0, 1], got {ratio}.")
    fixed = dense_parameters - sum(c.dense_cost for c in candidates)
    budget = ParameterBudget(dense_parameters, fixed, math.floor(ratio * dense_parameters))
    smallest = fixed + sum(c.cost(1) for c in candidates)
    if budget.target_parameters < smallest:
        raise BudgetError(
            f"target_param_ratio={ratio} is out of reach: with every targeted linear at rank 1 the model keeps "
            f"{smallest:,} of {dense_parameters:,} parameters, so the smallest reachable ratio is "
            f"{smallest / dense_parameters:.4f}. Raise the ratio or add target_modules."
        )
    return budget


def _total(candidates: Sequence[RankCandidate], ranks: dict[str, int | str | None]) -> int:
    """Weights ``ranks`` spends on ``candidates`` (joint candidates included where ``ranks`` chose them)."""
    return sum(c.cost(ranks[c.name]) for c in candidates if c.name in ranks)


def allocated_parameters(
    candidates: Sequence[RankCandidate], joints: Sequence[JointCandidate], ranks: dict[str, int | str | None]
) -> int:
    """Weights an allocation spends, separate and joint candidates together."""
    return _total([*candidates, *(joint.candidate for joint in joints)], ranks)


def _fill(
    candidates: Sequence[RankCandidate],
    ranks: dict[str, int | None],
    budget: int,
    priority: Callable[[RankCandidate, int, int | None], float],
) -> dict[str, int | None]:
    """Spend what is left of the budget one step at a time, best ``priority`` first."""
    ranks = dict(ranks)
    spent = _total(candidates, ranks)
    while True:
        best, best_score = None, -math.inf
        for candidate in candidates:
            rank = ranks.get(candidate.name, SHARED)
            if rank is DENSE or rank == SHARED:  # dense, or held by (or standing for) something else
                continue
            step = rank + 1 if rank < candidate.max_rank else DENSE
            extra = candidate.cost(step) - candidate.cost(rank)
            if spent + extra > budget:
                continue
            score = priority(candidate, rank, step)
            if score > best_score:
                best, best_score = (candidate, step, extra), score
        if best is None:
            return ranks
        candidate, step, extra = best
        ranks[candidate.name] = step
        spent += extra


def allocate_global(
    candidates: Sequence[RankCandidate], budget: int, joints: Sequence[JointCandidate] = ()
) -> dict[str, int | str | None]:
    """Mixed ranks minimizing the summed error within ``budget`` weights.

    Lagrangian relaxation: for a price λ each layer independently picks the rank (or dense) that
    minimizes ``error + λ·cost`` — exact per layer, including the dense/factorized cliff that a
    one-component-at-a-time greedy cannot see — and λ is bisected to the cheapest price that fits.
    A joint candidate is taken where its best ``error + λ·cost`` is below the sum of its members' (the
    same exact per-group choice). The leftover is filled greedily by error reduction per weight, within
    what was chosen. The result names every candidate, and each joint candidate that was taken.
    """

    def best_rank(c: RankCandidate, price: float) -> tuple[int | None, float]:
        ranks = torch.arange(1, c.max_rank + 1, dtype=torch.float64)
        objective = c.errors[1 : c.max_rank + 1].double() + price * ranks * c.rank_cost
        best = int(torch.argmin(objective)) + 1 if c.max_rank >= 1 else 1
        dense_objective = price * c.dense_cost
        if c.max_rank < 1 or dense_objective <= float(objective[best - 1]):
            return DENSE, dense_objective
        return best, float(objective[best - 1])

    def choose(price: float) -> dict[str, int | str | None]:
        choice, objectives = {}, {}
        for c in candidates:
            choice[c.name], objectives[c.name] = best_rank(c, price)
        for joint in joints:
            rank, objective = best_rank(joint.candidate, price)
            if rank is not DENSE and objective < sum(objectives[name] for name in joint.members):
                choice.update(dict.fromkeys(joint.members, SHARED))
                choice[joint.candidate.name] = rank
        return choice

    everything = [*candidates, *(joint.candidate for joint in joints)]
    if _total(candidates, dense := {c.name: DENSE for c in candidates}) <= budget:
        return dense
    low, high = 0.0, 1.0
    while _total(everything, choose(high)) > budget:
        high *= 4.0
        if high > 1e300:
            return _fill(candidates, {c.name: 1 for c in candidates}, budget, _gain_per_weight)
    for _ in range(200):
        middle = 0.5 * (low + high) if high < 1e-300 or low == 0 else math.sqrt(low * high)
        if middle in (low, high):
            break
        if _total(everything, choose(middle)) <= budget:
            high = middle
        else:
            low = middle
        if high - low <= 1e-12 * high:
            break
    return joints_as_members(_fill(everything, choose(high), budget, _gain_per_weight), joints)


def joints_as_members(
    ranks: dict[str, int | str | None], joints: Sequence[JointCandidate]
) -> dict[str, int | str | None]:
    """A joint candidate filled up to dense is its members kept dense (the same weights), so that nothing
    downstream meets a shared group without a rank. (The bisection rarely leaves one there: a price just below
    usually keeps the members dense already; the greedy fill can still step a joint at its top rank to dense.)"""
    ranks = dict(ranks)
    for joint in joints:
        if joint.candidate.name in ranks and ranks[joint.candidate.name] is DENSE:
            del ranks[joint.candidate.name]
            ranks.update(dict.fromkeys(joint.members, DENSE))
    return ranks


def _gain_per_weight(candidate: RankCandidate, rank: int, step: int | None) -> float:
    extra = candidate.cost(step) - candidate.cost(rank)
    return (candidate.error(rank) - candidate.error(step)) / max(extra, 1)


def allocate_uniform(
    candidates: Sequence[RankCandidate], budget: int, joints: Sequence[JointCandidate] = ()
) -> dict[str, int | None]:
    """Every layer at the same fraction of its full rank (the plain-SVD baseline), then filled evenly.
    Joint candidates are not used: a uniform allocation is the per-layer baseline."""

    def choose(fraction: float) -> dict[str, int | None]:
        choice = {}
        for c in candidates:
            rank = max(1, math.floor(fraction * min(c.in_features, c.out_features)))
            choice[c.name] = DENSE if rank > c.max_rank else rank
        return choice

    low, high = 0.0, 1.0
    if _total(candidates, choose(high)) <= budget:
        return choose(high)
    for _ in range(60):
        middle = 0.5 * (low + high)
        if _total(candidates, choose(middle)) <= budget:
            low = middle
        else:
            high = middle

    def lowest_relative_rank(candidate: RankCandidate, rank: int, step: int | None) -> float:
        return -rank / min(candidate.in_features, candidate.out_features)

    return _fill(candidates, choose(low), budget, lowest_relative_rank)


ALLOCATORS: dict[str, Callable[..., dict[str, int | str | None]]] = {
    "global": allocate_global,
    "uniform": allocate_uniform,
}
