"""Presets: small functions that take a resolved RunConfig and return it set up for one purpose.

`in100` is the paper's recipe at full size; `demo` and `smoke` keep the variant's features but shrink
width, depth and schedule so that any variant runs on a CPU in minutes or seconds. The parameter
budget is always checked on the variant at full DiT-S size, never on a shrunk preset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from dit.config import RunConfig

DEMO_ROOT = "data/digits"  # relative to the working directory, like runs/


def _shrink(config: RunConfig, *, model: dict, train: dict, eval: dict, data: dict | None = None) -> RunConfig:
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, **model),
        train=dataclasses.replace(config.train, **train),
        eval=dataclasses.replace(config.eval, **eval),
        data=dataclasses.replace(config.data, **(data or {})),
    )


def in100(config: RunConfig) -> RunConfig:
    """DiT-S recipe on the ImageNet-100 latent cache: AdamW 1e-4, batch 256, 400K steps, FID-10K every 50K."""
    return _shrink(config, model={}, train={}, eval=dict(reference="data/imagenet100-ref256.npz"),
                   data=dict(cache="data/imagenet100-latents"))


def demo(config: RunConfig) -> RunConfig:
    """The built-in digits (8x8) on a CPU in minutes: a 4-block, 128-wide model of the same variant."""
    return _shrink(
        config,
        model=dict(depth=4, hidden_size=128, num_heads=2, input_size=8, in_channels=3, num_classes=10,
                   conv_stem_width=16),
        # Tuned for a few minutes on 2 cores. Measured here with rope_swiglu, 2,500 steps of batch 32, cosine
        # learning rate, guidance 1.5, still with flips: fd_digits 16 with the flow objective at lr 2e-3, 45 at
        # 1e-3, and 119 with the DDPM loss at 1e-3. Without flips (below) the 2e-3 recipe gives 11.5. The EMA spans the last ~200 steps: DiT's 0.9999 spans 10,000, longer
        # than the whole run, and would still hold the zero-initialised weights at the end.
        train=dict(steps=2_500, batch_size=32, lr=2e-3, schedule="cosine", warmup_steps=100, ema_decay=0.995,
                   objective="flow", ckpt_every=500, log_every=50),
        # Guidance 1.5 gave the lowest fd_digits of scales 1, 1.5, 2 and 3 (at lr 1e-3: 44 against 52 unguided).
        eval=dict(every=1_250, num_samples=500, sampling_steps=50, batch_size=100, cfg_scale=1.5,
                  metric="fd_digits"),
        # No flips: a mirrored digit is not a digit (DiT flips ImageNet, where a mirror image is the same class).
        data=dict(cache=f"{DEMO_ROOT}/cache-8", flip=False),
    )


def smoke(config: RunConfig) -> RunConfig:
    """Any config shrunk to seconds, for tests: 2 blocks, 64 wide, the digits at 8x8 pixels, a few steps."""
    return _shrink(
        config,
        model=dict(depth=2, hidden_size=64, num_heads=2, input_size=8, in_channels=3, num_classes=10,
                   conv_stem_width=8),
        train=dict(steps=4, batch_size=8, ckpt_every=2, log_every=1),
        eval=dict(every=4, num_samples=16, sampling_steps=4, batch_size=8, metric="fd_digits"),
        data=dict(cache=f"{DEMO_ROOT}/cache-8", flip=False),
    )


def prepare_data(config: RunConfig, progress: bool = True) -> None:
    """Builds the built-in digits cache on first use, when the config points at it; other data is
    made by the user's own `python -m dit.data.extract` and only checked."""
    cache = Path(config.data.cache)
    if config.data.cache and cache.parent == Path(DEMO_ROOT) and not (cache / "manifest.json").exists():
        from dit.data.demo import demo_cache
        demo_cache(cache.parent, resolution=int(cache.name.removeprefix("cache-")), progress=progress)


PRESETS: dict[str, Callable[[RunConfig], RunConfig]] = {"in100": in100, "demo": demo, "smoke": smoke}
