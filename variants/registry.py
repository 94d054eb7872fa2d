"""The DiT-S variants: each feature is a few config fields; a variant name joins features with "_".

`rope_swiglu` is `rope` + `swiglu`. Adding a feature or a registered variant is one entry below.
"""

from __future__ import annotations

import dataclasses
import difflib

from dit.config import ModelConfig, dit_config
from dit.errors import UserError

# Feature name -> the ModelConfig fields it sets on top of DiT-S/2 (100 classes, 32x32x4 latents).
FEATURES: dict[str, dict] = {
    "baseline": {},
    "rope": {"pos_embed": "rope"},  # 2D axial rotary embedding on q, k; no absolute position embedding
    "sincos_rope": {"pos_embed": "sincos_rope"},  # the absolute sin-cos embedding and RoPE, as LightningDiT
    "swiglu": {"mlp": "swiglu"},  # hidden 1024 = 2/3 x 1536: the same weight count as the GELU MLP
    "qknorm": {"qk_norm": True},
    "rmsnorm": {"norm": "rmsnorm"},  # in the blocks only; the final layer keeps DiT's LayerNorm
    # LightningDiT's RMSNorm: a learned weight, in the blocks and the final layer (+9,600 parameters)
    "rmsnorm_weighted": {"norm": "rmsnorm", "final_norm": "rmsnorm",
                         "norm_weight": True},
    "no_sigma": {"learn_sigma": False},  # predict only the noise (or velocity): LightningDiT's default
    "wo_shift": {"adaln_shift": False},  # adaLN scales and gates only, as LightningDiT's wo_shift
    "shared_adaln": {"adaln": "shared"},  # frees ~9.7M parameters (11 of 12 modulation networks)
    "deep17": {"depth": 17},  # spends the freed budget on depth; over budget without shared_adaln
    "wide448": {"hidden_size": 448, "num_heads": 7},  # ... or on width (head dim stays 64)
    "patch1": {"patch_size": 1},  # 1024 tokens on 32x32 latents: ~5x the FLOPs (attention is quadratic), fewer parameters
    "convstem": {"stem": "conv"},  # two 3x3 convs before the linear patchify, patch size 2
}

# Names that stand for a combination.
ALIASES: dict[str, str] = {
    # LightningDiT's architecture at S/2 as its code builds it with its released config (use_swiglu,
    # use_rope, use_rmsnorm; use_qknorm and wo_shift off; learn_sigma off, the class default)
    "lightning": "sincos_rope_swiglu_rmsnorm_weighted_no_sigma",
}

# What `python -m variants` lists and CI holds to the budget.
REGISTERED: tuple[str, ...] = (
    "baseline", "rope", "swiglu", "qknorm", "rmsnorm", "shared_adaln", "shared_adaln_deep17",
    "shared_adaln_wide448", "patch1", "convstem", "rope_swiglu", "lightning",
)


class UnknownVariant(UserError):
    pass


def known_names() -> list[str]:
    return sorted({*FEATURES, *ALIASES, *REGISTERED})


def split_features(name: str) -> list[str]:
    """Splits a variant name into features, longest feature first at each position (features contain "_")."""
    name = ALIASES.get(name, name)
    parts, features = name.split("_"), []
    while parts:
        for n in range(len(parts), 0, -1):
            candidate = "_".join(parts[:n])
            if candidate in FEATURES or candidate in ALIASES:
                features.extend(split_features(candidate) if candidate in ALIASES else [candidate])
                parts = parts[n:]
                break
        else:
            close = difflib.get_close_matches(name, known_names(), n=1, cutoff=0.4)
            hint = f" The closest known name is {close[0]!r}." if close else ""
            raise UnknownVariant(
                f"unknown variant {name!r}: {'_'.join(parts)!r} is not a feature. Known variants: "
                f"{', '.join(REGISTERED)}; features that compose with '_': {', '.join(FEATURES)}.{hint}"
            )
    return features


def resolve(name: str) -> ModelConfig:
    """The DiT-S/2 config of a variant name, its features applied in order; repeated or conflicting ones fail."""
    features = split_features(name)
    repeated = [f for i, f in enumerate(features) if f in features[:i]]
    if repeated:
        expanded = "_".join(features)
        through = f" (it expands to {expanded})" if expanded != name else ""
        raise UserError(f"variant {name!r} names the feature {repeated[0]!r} twice{through}; name each feature once.")
    fields: dict = {}
    for feature in features:
        for key, value in FEATURES[feature].items():
            if key in fields and fields[key] != value:
                raise UserError(f"variant {name!r}: features disagree on model.{key} ({fields[key]!r} vs {value!r}).")
            fields[key] = value
    return dit_config("S/2", num_classes=100, input_size=32, in_channels=4, **fields)


def reference_geometry(cfg: ModelConfig) -> ModelConfig:
    """The config at the geometry the budget is defined on: 100 classes, 32x32x4 latents."""
    return dataclasses.replace(cfg, num_classes=100, input_size=32, in_channels=4)
