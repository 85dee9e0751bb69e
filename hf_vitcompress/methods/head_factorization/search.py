"""Differentiable per-head rank search for head-factorized attention (COMCAT's search, done on training data).

Every head's two products (Q·Kᵀ and V·O) get a categorical choice over candidate ranks derived from
the head dimension (multiples of ``head_dim / 8``). A Gumbel-softmax sample ``p`` turns the choice into a
soft mask on the product's singular components, strongest first: component ``i`` is scaled by
``Σ_c p_c · [i < r_c]``. Only the choice logits are trained, with COMCAT's loss
``CE · (P / P_target)^β`` while the expected parameter count ``P`` is over budget (plain CE otherwise),
and the temperature is annealed exponentially (5 → 0.1). The weights are the SVD factors of the dense
products at full rank, so no ``d × d`` matrix and no per-candidate copy is ever materialized.

The search runs on the data it is given, which should be a held-out part of the *training* split (the
official code searches on the validation set; this one never touches evaluation data). Afterwards the
chosen ranks are projected onto the budget exactly: ranks move one at a time, cheapest preference
first, until the model is within one rank step below ``target_param_ratio``.

The attentions are **factorized again**, not taken from the compressed model: the search needs every
head's full-rank SVD, and ``compress()`` keeps only the truncated factors (its statistics are not
saved). The dense attentions are re-factorized on fresh statistics, by default from the first
``calibration_batches`` of the search data, so the searched model's attention factors (at every rank,
not only the changed ones) come from those images, not from the compression's calibration set. Pass
``calibration_data`` (the compression's calibration images, at most its ``calibration_samples`` are
used, as ``compress()`` does) to factorize on exactly the statistics the compression used. Which it
was is recorded in ``config.compression_provenance["rank_search"]["attention_statistics"]``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...budget import BudgetError
from ...calibration.data import interpolated_positions, iter_calibration_batches, patch_size_of
from ...calibration.gram import collect_linear_statistics
from ...plan import CompressionPlan, count_parameters, set_submodule
from ...training.schedules import Schedule
from .factorization import AttentionFactorization, build_head_factorized, factorize_attention, install_head_factorized


class RankSearchError(RuntimeError):
    """The search diverged (non-finite loss or logits)."""


def candidate_ranks(head_dim: int, levels: int = 8) -> list[int]:
    """Multiples of ``head_dim / levels`` up to ``head_dim`` (e.g. 8, 16, …, 64 for ``head_dim`` 64)."""
    step = max(1, head_dim // levels)
    ranks = list(range(step, head_dim + 1, step))
    return ranks if ranks[-1] == head_dim else [*ranks, head_dim]


@dataclass
class RankSearchResult:
    """What the search chose: per attention module, per head, the query·key and value·output ranks."""

    qk_ranks: dict[str, list[int]]
    vo_ranks: dict[str, list[int]]
    history: list[dict[str, float]] = field(default_factory=list)


class _MaskedProducts(nn.Module):
    """The choice logits of one attention and the component masks they induce."""

    def __init__(self, heads: int, head_dim: int, candidates: list[int]) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        # Start by preferring full rank slightly, so early masks keep the model close to dense.
        start = torch.linspace(0.0, 1.0, len(candidates))
        self.qk_logits = nn.Parameter(start.repeat(heads, 1).clone())
        self.vo_logits = nn.Parameter(start.repeat(heads, 1).clone())
        levels = torch.tensor(candidates)
        self.register_buffer("keeps", (torch.arange(head_dim)[None, :] < levels[:, None]).float())  # [C, d_h]
        self.register_buffer("ranks", levels.float())
        self.temperature = 5.0
        self.state: dict[str, torch.Tensor] = {}  # this step's masks, read by the forward hooks
        self.generator: torch.Generator | None = None  # set by search_ranks: reproducible, global RNG untouched

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Gumbel-softmax sample (F.gumbel_softmax cannot take a generator)."""
        uniform = torch.rand(logits.shape, generator=self.generator, dtype=logits.dtype).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return torch.softmax((logits + gumbel) / self.temperature, dim=-1)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qk_mask [H·d_h], vo_mask [H·d_h], expected qk ranks [H], expected vo ranks [H])``."""
        p_qk, p_vo = self._sample(self.qk_logits), self._sample(self.vo_logits)
        return (
            (p_qk @ self.keeps).reshape(-1),
            (p_vo @ self.keeps).reshape(-1),
            p_qk @ self.ranks,
            p_vo @ self.ranks,
        )


def _fixed_parameters(model: nn.Module, names: list[str]) -> int:
    """Weights outside the searched factors: everything but the four factor linears (their output bias stays)."""
    searched = 0
    for name in names:
        module = model.get_submodule(name)
        searched += sum(p.numel() for p in module.parameters()) - (module.vo_up.bias.numel() if module.out_bias else 0)
    return count_parameters(model) - searched


def search_ranks(
    model: nn.Module,
    dense_model: nn.Module,
    data: Iterable[dict[str, torch.Tensor]],
    *,
    target_param_ratio: float | None = None,
    steps: int = 200,
    learning_rate: float = 0.05,
    beta: float = 1.5,
    temperature: tuple[float, float] = (5.0, 0.1),
    calibration_batches: int = 8,
    calibration_data: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Return a copy of ``model`` (compressed with ``method="head_factorization"``) whose per-head ranks were
    searched on ``data`` (labelled ``{"pixel_values", "labels"}`` batches of a held-out *training* split).

    MLP and other low-rank layers keep their ranks; the attention heads share what the budget leaves.
    ``target_param_ratio`` defaults to the ratio the model was compressed to.

    Every attention is re-factorized from ``dense_model`` (see the module docstring): on the statistics
    of ``calibration_data`` when given (anything ``compress()`` takes; pass the compression's calibration
    images to reproduce its factors), else of the first ``calibration_batches`` batches of ``data``.
    The source and image count are recorded in ``compression_provenance["rank_search"]["attention_statistics"]``.
    """
    plan = CompressionPlan.from_dict(model.config.compression_plan or {"layers": {}})
    names = [name for name, layer in plan.layers.items() if layer.kind == "head_factorized"]
    if not names:
        raise ValueError(
            "search_ranks needs a model compressed with method='head_factorization' (no head-factorized attention found)."
        )
    if getattr(dense_model.config, "num_labels", None) != getattr(model.config, "num_labels", None):
        raise ValueError("dense_model must be the model that was compressed (its label space differs).")
    batches = [batch for batch in data]
    if not batches or any("labels" not in batch for batch in batches):
        raise ValueError(
            "search_ranks needs labelled batches ({'pixel_values', 'labels'}) from a held-out training split."
        )
    ratio = (
        target_param_ratio if target_param_ratio is not None else model.config.compression_config["target_param_ratio"]
    )
    target = math.floor(ratio * plan.dense_parameters)

    generator = torch.Generator().manual_seed(seed)
    parameter = next(dense_model.parameters())
    if calibration_data is not None:  # the compression's own images: the same statistics, the same factors
        statistics_batches = list(
            iter_calibration_batches(
                calibration_data,
                max_samples=model.config.compression_config.get("calibration_samples", 512),
                num_channels=dense_model.config.num_channels,
                patch_size=patch_size_of(dense_model.config),
                device=parameter.device,
                dtype=parameter.dtype,
            )
        )
        statistics_source = "calibration_data"
    else:
        statistics_batches = batches[:calibration_batches]
        statistics_source = "search_data"
    with interpolated_positions(dense_model):  # images of another size than config.image_size
        statistics = collect_linear_statistics(dense_model, [f"{n}.q_proj" for n in names], statistics_batches)
    factorizations: dict[str, AttentionFactorization] = {
        name: factorize_attention(
            dense_model.get_submodule(name),
            statistics[f"{name}.q_proj"],
            model.config.compression_config.get("damping", 1e-6),
        )
        for name in names
    }
    working = copy.deepcopy(model).eval()
    controllers: dict[str, _MaskedProducts] = {}
    handles = []
    for name in names:
        factorization = factorizations[name]
        heads, head_dim = len(factorization.qk), factorization.head_dim
        full = build_head_factorized(
            dense_model.get_submodule(name), factorization, [head_dim] * heads, [head_dim] * heads
        )
        set_submodule(working, name, full)
        controller = _MaskedProducts(heads, head_dim, candidate_ranks(head_dim)).to(full.qk_left.weight.device)
        controller.generator = generator
        controllers[name] = controller
        state = controller.state

        def qk_hook(_module, _args, output, _state=state):
            return output * _state["qk"].to(output.dtype)

        def vo_hook(_module, _args, output, _state=state):
            return output * _state["vo"].to(output.dtype)

        # Scaling the query-side component scales its score term; the value side, its output term.
        handles += [full.qk_left.register_forward_hook(qk_hook), full.vo_down.register_forward_hook(vo_hook)]
    for parameter in working.parameters():
        parameter.requires_grad_(False)
    logits = [p for c in controllers.values() for p in c.parameters()]
    optimizer = torch.optim.Adam(logits, lr=learning_rate)
    schedule = Schedule(temperature[0], temperature[1], "exponential")
    fixed = _fixed_parameters(working, names)
    hidden = {name: dense_model.get_submodule(name).q_proj.in_features for name in names}
    costs = {name: factorizations[name].rank_costs(hidden[name]) for name in names}  # (qk, vo) per rank

    def expected_parameters() -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for name, controller in controllers.items():
            qk_mask, vo_mask, qk_rank, vo_rank = controller.masks()
            controller.state["qk"], controller.state["vo"] = qk_mask, vo_mask
            total = total + qk_rank.sum().double() * costs[name][0] + vo_rank.sum().double() * costs[name][1]
        return total + fixed

    history: list[dict[str, float]] = []
    with interpolated_positions(working):  # search images of another size than config.image_size
        try:
            for step in tqdm(range(steps), desc="rank search", disable=not progress, unit="step"):
                for controller in controllers.values():
                    controller.temperature = schedule.value(step / max(steps - 1, 1))
                batch = batches[step % len(batches)]
                parameters = expected_parameters()
                cross_entropy = F.cross_entropy(
                    working(pixel_values=batch["pixel_values"]).logits.float(), batch["labels"]
                )
                over = (parameters / target).clamp_min(1.0)
                loss = cross_entropy * over.float() ** beta
                if not torch.isfinite(loss):
                    raise RankSearchError(
                        f"The rank search diverged at step {step} (loss {loss.detach().item()}): lower learning_rate, or check the data."
                    )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                history.append(
                    {"step": step, "cross_entropy": cross_entropy.item(), "expected_parameters": parameters.item()}
                )
        finally:
            for handle in handles:
                handle.remove()

    # Preferences → ranks, then projection onto the budget (exact to one rank step).
    preferences = {}
    for name, controller in controllers.items():
        levels = controller.ranks.long().tolist()
        qk = [levels[i] for i in controller.qk_logits.argmax(-1).tolist()]
        vo = [levels[i] for i in controller.vo_logits.argmax(-1).tolist()]
        preferences[name] = (qk, vo, controller)
    qk_ranks, vo_ranks = _project(preferences, factorizations, costs, fixed, target)

    searched = copy.deepcopy(model)
    layers = dict(plan.layers)
    for name in names:
        layers[name] = install_head_factorized(
            searched, name, dense_model.get_submodule(name), factorizations[name], qk_ranks[name], vo_ranks[name]
        )
        searched.get_submodule(name).to(dtype=next(model.parameters()).dtype)
    new_plan = CompressionPlan(
        layers=layers, dense_parameters=plan.dense_parameters, parameters=count_parameters(searched)
    )
    searched.config.compression_plan = new_plan.to_dict()
    provenance = dict(getattr(searched.config, "compression_provenance", None) or {})
    provenance["rank_search"] = {
        "steps": steps,
        "images": sum(len(b["pixel_values"]) for b in batches),
        "beta": beta,
        "temperature": list(temperature),
        "learning_rate": learning_rate,
        "target_param_ratio": ratio,
        # The attentions were re-factorized (see the module docstring): on which images.
        "attention_statistics": {
            "source": statistics_source,
            "images": sum(_batch_size(b) for b in statistics_batches),
            "note": "every attention re-factorized from the dense model on the statistics of the first "
            f"{calibration_batches} search batches, not of the compression's calibration images"
            if statistics_source == "search_data"
            else "every attention re-factorized from the dense model on the statistics of the given calibration data",
        },
    }
    searched.config.compression_provenance = provenance
    searched.rank_search = RankSearchResult(qk_ranks, vo_ranks, history)
    return searched


def _batch_size(batch: torch.Tensor | dict) -> int:
    return len(batch["pixel_values"] if isinstance(batch, dict) else batch)


def _interpolated_preference(logits: torch.Tensor, levels: list[int], rank: int) -> float:
    """The search's preference for any integer rank, interpolated between candidate levels."""
    values = logits.detach().double().tolist()
    points = [0, *levels]
    scores = [min(values) - 1.0, *values]
    for i in range(1, len(points)):
        if rank <= points[i]:
            t = (rank - points[i - 1]) / (points[i] - points[i - 1])
            return scores[i - 1] + t * (scores[i] - scores[i - 1])
    return scores[-1]


def _project(preferences, factorizations, costs, fixed, target):
    """Move ranks one at a time until the model is at most ``target`` and within one step of it."""
    ranks = {
        (name, kind, h): r
        for name, (qk, vo, _) in preferences.items()
        for kind, rs in (("qk", qk), ("vo", vo))
        for h, r in enumerate(rs)
    }

    def unit(name, kind):
        return costs[name][0 if kind == "qk" else 1]

    def total():
        return fixed + sum(r * unit(name, kind) for (name, kind, _), r in ranks.items())

    tables = {}  # the search's preference for every integer rank of every head product
    for key in ranks:
        name, kind, h = key
        controller = preferences[name][2]
        logits = (controller.qk_logits if kind == "qk" else controller.vo_logits)[h]
        levels = controller.ranks.long().tolist()
        tables[key] = [_interpolated_preference(logits, levels, r) for r in range(factorizations[name].head_dim + 1)]

    def preference(key, rank):
        return tables[key][rank]

    smallest = fixed + sum(unit(name, kind) for name, kind, _ in ranks)
    if smallest > target:
        raise BudgetError(
            f"The budget is out of reach with the other layers' ranks fixed: every head at rank 1 already gives "
            f"{smallest:,} parameters against a target of {target:,}."
        )
    while total() > target:  # shrink where the search minds least per weight freed
        key = min(
            (k for k, r in ranks.items() if r > 1),
            key=lambda k: (preference(k, ranks[k]) - preference(k, ranks[k] - 1)) / unit(k[0], k[1]),
        )
        ranks[key] -= 1
    while True:  # grow where the search wants it most, as long as it fits
        spare = target - total()
        options = [k for k, r in ranks.items() if r < factorizations[k[0]].head_dim and unit(k[0], k[1]) <= spare]
        if not options:
            break
        key = max(options, key=lambda k: (preference(k, ranks[k] + 1) - preference(k, ranks[k])) / unit(k[0], k[1]))
        ranks[key] += 1
    qk = {name: [ranks[(name, "qk", h)] for h in range(len(preferences[name][0]))] for name in preferences}
    vo = {name: [ranks[(name, "vo", h)] for h in range(len(preferences[name][1]))] for name in preferences}
    return qk, vo
