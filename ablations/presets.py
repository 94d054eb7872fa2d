"""Presets: small functions that take a resolved RunConfig and return it set up for one purpose.

`in100` is the paper's recipe at full size; `demo` and `smoke` keep the variant's features but shrink
width, depth and schedule so that any variant runs on a CPU in minutes or seconds. The parameter
budget is always checked on the variant at full DiT-S size, never on a shrunk preset.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from dit.config import RunConfig


def _shrink(config: RunConfig, *, model: dict, train: dict, eval: dict) -> RunConfig:
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, **model),
        train=dataclasses.replace(config.train, **train),
        eval=dataclasses.replace(config.eval, **eval),
    )


def in100(config: RunConfig) -> RunConfig:
    """DiT-S recipe on the ImageNet-100 latent cache: AdamW 1e-4, batch 256, 400K steps, FID-10K every 50K."""
    return config


def demo(config: RunConfig) -> RunConfig:
    """The built-in demo data on a CPU in minutes: a 4-block, 128-wide model of the same variant."""
    return _shrink(
        config,
        model=dict(depth=4, hidden_size=128, num_heads=2),
        train=dict(steps=2_000, batch_size=32, lr=3e-4, ema_decay=0.999, ckpt_every=500, log_every=50),
        eval=dict(every=1_000, num_samples=500, sampling_steps=50),
    )


def smoke(config: RunConfig) -> RunConfig:
    """Any config shrunk to seconds, for tests: 2 blocks, 64 wide, 8x8 latents, a few steps."""
    return _shrink(
        config,
        model=dict(depth=2, hidden_size=64, num_heads=2, input_size=8, conv_stem_width=8),
        train=dict(steps=4, batch_size=4, ckpt_every=2, log_every=1),
        eval=dict(every=4, num_samples=8, sampling_steps=4),
    )


PRESETS: dict[str, Callable[[RunConfig], RunConfig]] = {"in100": in100, "demo": demo, "smoke": smoke}
