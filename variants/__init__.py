"""The registry of DiT-S variants and the parameter budget they are held to."""

from variants.budget import BUDGET, OverBudget, VariantCost, check_budget, measure
from variants.registry import ALIASES, FEATURES, REGISTERED, UnknownVariant, resolve, split_features

__all__ = ["ALIASES", "BUDGET", "FEATURES", "REGISTERED", "OverBudget", "UnknownVariant", "VariantCost",
           "check_budget", "measure", "resolve", "split_features"]
