"""Presets: small functions that take a resolved RunConfig and return it set up for one purpose.

A preset is a data size (ImageNet-100 at full DiT-S size, or the built-in digits shrunk to minutes)
with a training recipe: `paper` (DiT's, 2022) or `flow_repa` (the newer additions, each with its
source). `in100` is the paper's recipe at full size and `in100_flow_repa` the newer one; `demo_paper`
and `demo_flow_repa` are the same two recipes at demo size, for comparing them on a CPU. `demo` and
`smoke` keep the variant's features but shrink width, depth and schedule so that any variant runs on
a CPU in minutes or seconds. The parameter budget is always checked on the variant at full DiT-S
size, never on a shrunk preset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from dit.config import RunConfig

DEMO_ROOT = "data/digits"  # relative to the working directory, like runs/
DIGITS_RESOLUTION = 8  # the digits as they are: 8x8 pixels
DIGITS = dict(builtin="digits", cache=f"{DEMO_ROOT}/cache-{DIGITS_RESOLUTION}", resolution=DIGITS_RESOLUTION)


def _shrink(config: RunConfig, *, model: dict, train: dict, eval: dict, data: dict | None = None) -> RunConfig:
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, **model),
        train=dataclasses.replace(config.train, **train),
        eval=dataclasses.replace(config.eval, **eval),
        data=dataclasses.replace(config.data, **(data or {})),
    )


# The DiT paper's recipe: DDPM with learned sigma, AdamW 1e-4 (betas 0.9, 0.999), 250 DDPM steps, guidance on
# the first 3 latent channels at every noise level (TrainConfig's and EvalConfig's defaults).
PAPER_TRAIN: dict = dict(objective="ddpm", time_sampling="uniform", beta2=0.999, cosine_loss=0.0, grad_clip=0.0)
PAPER_EVAL: dict = dict(sampler="", guided_channels=3, guidance_low=0.0, guidance_high=1.0, timestep_shift=0.0)

# The newer recipe, each setting with its source:
FLOW_REPA_TRAIN: dict = dict(
    objective="flow",  # SiT's linear interpolant and velocity (SiT-S/2: FID-50K 57.6 against DiT-S/2's 68.4)
    time_sampling="logit_normal",  # SD3, LightningDiT (XL/2 at 400K: FID 16.6 -> 14.0)
    cosine_loss=1.0,  # LightningDiT's velocity-direction loss, weight 1 (14.0 -> 12.5)
    beta2=0.95,  # LightningDiT's AdamW beta2. Its lr 2e-4 goes with batch 1024; at batch 256 we keep 1e-4, as SiT and REPA
    # REPA: the tokens after block 4 of 12 aligned with DINOv2-B features, weight 0.5 (SiT-B/2 at 400K: FID
    # 33.0 -> 24.4). Needs a cache extracted with --repa-encoder; REPA trains without flips.
    repa_weight=0.5, repa_block=0,
    # REPA's gradient clipping (train.py: --max-grad-norm 1.0). It also tames the velocity-direction term's
    # first gradient: at the zero-initialised output its cosine is 0/eps, so the gradient is about 1e8.
    grad_clip=1.0,
)
FLOW_REPA_EVAL: dict = dict(
    sampler="euler", timestep_shift=0.3,  # LightningDiT's sampler: Euler, 250 steps, time shift 0.3
    guided_channels=0,  # guidance on every latent channel, as SiT, REPA and LightningDiT's released sampling
    guidance_low=0.0, guidance_high=0.89,  # LightningDiT's cfg_interval_start 0.11: no guidance near pure noise
)


def in100(config: RunConfig) -> RunConfig:
    """DiT-S recipe on the ImageNet-100 latent cache: AdamW 1e-4, batch 256, 400K steps, FID-10K every 50K."""
    return _shrink(config, model={}, train=PAPER_TRAIN, eval=dict(PAPER_EVAL, reference="data/imagenet100-ref256.npz"),
                   data=dict(cache="data/imagenet100-latents"))


def in100_flow_repa(config: RunConfig) -> RunConfig:
    """The newer recipe on the ImageNet-100 latent cache (with REPA targets), at in100's size, batch and steps."""
    return _shrink(in100(config), model={}, train=FLOW_REPA_TRAIN, eval=FLOW_REPA_EVAL,
                   data=dict(cache="data/imagenet100-latents-repa", flip=False))


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
        data=dict(DIGITS, flip=False),
    )


def demo_paper(config: RunConfig) -> RunConfig:
    """`demo` with the paper's recipe: DDPM, the DDPM sampler (50 steps), guidance on 3 channels, beta2 0.999."""
    return _shrink(demo(config), model={}, train=PAPER_TRAIN, eval=PAPER_EVAL)


def demo_flow_repa(config: RunConfig) -> RunConfig:
    """`demo` with the newer recipe (FLOW_REPA_*), but no REPA term: DINOv2 features of 8x8 digits mean nothing."""
    return _shrink(demo(config), model={}, train=dict(FLOW_REPA_TRAIN, repa_weight=0.0), eval=FLOW_REPA_EVAL)


def smoke(config: RunConfig) -> RunConfig:
    """Any config shrunk to seconds, for tests: 2 blocks, 64 wide, the digits at 8x8 pixels, a few steps."""
    return _shrink(
        config,
        model=dict(depth=2, hidden_size=64, num_heads=2, input_size=8, in_channels=3, num_classes=10,
                   conv_stem_width=8),
        train=dict(steps=4, batch_size=8, ckpt_every=2, log_every=1),
        eval=dict(every=4, num_samples=16, sampling_steps=4, batch_size=8, metric="fd_digits"),
        data=dict(DIGITS, flip=False),
    )


def prepare_data(config: RunConfig, progress: bool = True) -> None:
    """Builds the built-in digits cache on first use where the config names them (data.builtin=digits);
    other data is made by the user's own `python -m dit.data.extract` and only checked."""
    if config.data.builtin == "digits":
        from dit.data.demo import digits_cache
        digits_cache(Path(config.data.cache), config.data.resolution, progress)


PRESETS: dict[str, Callable[[RunConfig], RunConfig]] = {
    "in100": in100, "in100_flow_repa": in100_flow_repa, "demo": demo, "demo_paper": demo_paper,
    "demo_flow_repa": demo_flow_repa, "smoke": smoke}
