"""The 33,000,000-parameter budget every variant is held to, checked before any run state exists."""

from __future__ import annotations

from dataclasses import dataclass

from dit.config import ModelConfig, TrainConfig
from dit.errors import UserError
from variants.registry import reference_geometry

BUDGET = 33_000_000


class OverBudget(UserError):
    exit_code = 2


@dataclass(frozen=True)
class VariantCost:
    name: str
    params: int  # trainable, at 100 classes and 32x32x4 latents
    gflops: float  # multiply-accumulates of one forward of one image, / 1e9
    repa_params: int = 0  # training-only: REPA's projector at this width (train.repa_* defaults), outside the budget

    @property
    def within_budget(self) -> bool:
        return self.params <= BUDGET


def measure(name: str, cfg: ModelConfig, train: TrainConfig = TrainConfig()) -> VariantCost:
    """Parameters and GFLOPs of a model config at the budget's reference geometry, from shapes alone, and the
    training-only parameters REPA adds (its projector; the budget is the sampling model's)."""
    # Imported here: counting traces the model (JAX), and the analysis imports BUDGET without JAX.
    from dit.counting import count_gflops, count_params

    reference = reference_geometry(cfg)
    return VariantCost(name, count_params(reference), count_gflops(reference), repa_projector_params(cfg, train))


def repa_projector_params(cfg: ModelConfig, train: TrainConfig) -> int:
    """REPA's projector: three linear layers, width -> repa_projector_dim -> repa_projector_dim -> repa_target_dim."""
    sizes = (cfg.hidden_size, train.repa_projector_dim, train.repa_projector_dim, train.repa_target_dim)
    return sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))


def check_budget(name: str, cfg: ModelConfig) -> VariantCost:
    """Returns the cost, or raises OverBudget with the numbers when the variant does not fit."""
    cost = measure(name, cfg)
    if not cost.within_budget:
        raise OverBudget(
            f"variant {name!r} has {cost.params:,} trainable parameters, over the budget of {BUDGET:,} by "
            f"{cost.params - BUDGET:,} (counted at 100 classes on 32x32x4 latents). Nothing was created. "
            f"Make it smaller (fewer blocks, a narrower width, or shared_adaln to free the modulation "
            f"parameters) until it fits."
        )
    return cost
