"""Configs as frozen dataclasses: the model, the training recipe, evaluation, and the run that holds them.

Every run saves its resolved `RunConfig` (see `to_dict`), and `--set section.field=value` reaches every
field through `apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

from dit.errors import UserError


class ConfigError(UserError):
    """A config value or override that cannot be used."""


# Named DiT sizes from the paper: (depth, hidden size, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

_CHOICES = {
    "pos_embed": ("sincos", "rope", "sincos_rope"),
    "mlp": ("gelu", "swiglu"),
    "norm": ("layernorm", "rmsnorm"),
    "final_norm": ("layernorm", "rmsnorm"),
    "adaln": ("per_block", "shared"),
    "stem": ("linear", "conv"),
    "dtype": ("float32", "bfloat16", "float16"),
    "remat": ("none", "block", "dots"),
    "attention": ("auto", "dense", "blockwise"),
}

# The samplers that fit each objective, its default (eval.sampler="") first. dit.sample builds them.
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("sde", "euler", "heun")}

# model.scan_blocks=auto runs the blocks as one lax.scan on these platforms and writes them out elsewhere.
SCAN_BLOCKS_ON = ("cpu",)

# train.split_state=auto keeps the whole state on every device on these platforms (a CPU's devices share
# one memory: splitting saves nothing there) and splits it over the devices elsewhere.
STATE_WHOLE_ON = ("cpu",)

# model.attention=auto picks blockwise attention above this many tokens (patch size 1 on 32x32 latents:
# 1024), where the dense (B, heads, T, T) float32 logits dominate the step's memory.
BLOCKWISE_ABOVE_TOKENS = 256


@dataclass(frozen=True)
class ModelConfig:
    """A DiT architecture. The defaults are DiT-S/2 on 32x32x4 latents (256px images) with 100 classes."""

    input_size: int = 32  # latent height and width
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 100  # the null (unconditional) label is num_classes
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True  # output 2x channels: epsilon and the sigma interpolation
    # sincos: fixed absolute 2D added to the tokens; rope: 2D axial rotary on q and k instead; sincos_rope:
    # both, as LightningDiT
    pos_embed: str = "sincos"
    mlp: str = "gelu"  # gelu: GELU-tanh MLP; swiglu: gated SiLU MLP
    swiglu_hidden: int = 0  # 0: 2/3 of the GELU width rounded up to 64, which keeps the weight count
    norm: str = "layernorm"  # norm of the residual stream inside blocks (no affine, as DiT)
    final_norm: str = "layernorm"  # the final layer's norm: layernorm as DiT, rmsnorm as LightningDiT
    norm_weight: bool = False  # a learned per-channel weight (init 1) on the blocks' and final norms, as LightningDiT
    qk_norm: bool = False  # RMS-normalise q and k per head, with a learned scale
    adaln: str = "per_block"  # per_block: adaLN-Zero as DiT; shared: adaLN-single as PixArt-alpha
    adaln_shift: bool = True  # False: the blocks' adaLN scales and gates without shifts (LightningDiT's wo_shift)
    stem: str = "linear"  # linear: patchify as one linear layer; conv: two 3x3 convs, then patchify
    conv_stem_width: int = 64
    dtype: str = "float32"  # compute dtype of matrix products; parameters stay float32
    # True: the stacked blocks run as one lax.scan; False: the same loop written out; auto: scanned on the
    # CPU, written out on accelerators (decided for the platform the program is compiled for).
    scan_blocks: bool | str = "auto"
    remat: str = "none"  # recompute each block in the backward pass: none | block (all) | dots (keep weight products)
    attention: str = "auto"  # dense | blockwise (online softmax, memory linear in tokens) | auto (by token count)
    attention_block: int = 128  # key block of blockwise attention

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"model.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}; "
                    f"set it to one of those."
                )
        if self.scan_blocks not in (True, False, "auto"):
            raise ConfigError(f"model.scan_blocks={self.scan_blocks!r} must be true, false or auto.")
        positive = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes",
                    "attention_block", "conv_stem_width")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be a positive integer.")
        if self.input_size % self.patch_size:
            raise ConfigError(
                f"model.input_size={self.input_size} is not divisible by model.patch_size={self.patch_size}; "
                f"choose a patch size that divides the latent size."
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                f"choose a head count that divides the width."
            )
        if self.uses_rope and self.head_dim % 4:
            raise ConfigError(
                f"2D RoPE splits each head into row and column halves of rotated pairs, so the head dimension "
                f"must be divisible by 4, but it is {self.head_dim}; change model.hidden_size or model.num_heads."
            )
        if self.uses_sincos and self.hidden_size % 4:
            raise ConfigError("the 2D sin-cos position embedding needs model.hidden_size divisible by 4.")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"model.class_dropout_prob={self.class_dropout_prob} must lie in [0, 1).")
        if not (math.isfinite(self.mlp_ratio) and int(self.hidden_size * self.mlp_ratio) > 0):
            raise ConfigError(
                f"model.mlp_ratio={self.mlp_ratio} must be a finite number > 0 that gives the MLP at least one unit "
                f"(hidden_size x mlp_ratio >= 1); DiT uses 4."
            )
        if self.swiglu_hidden < 0:
            raise ConfigError(
                f"model.swiglu_hidden={self.swiglu_hidden} must be >= 0; give the SwiGLU width, or 0 for 2/3 of the "
                f"GELU width."
            )

    def blocks_scanned_on(self, platform: str) -> bool:
        """Whether the program compiled for `platform` runs the blocks as one scan (model.scan_blocks)."""
        return platform in SCAN_BLOCKS_ON if self.scan_blocks == "auto" else bool(self.scan_blocks)

    @property
    def uses_rope(self) -> bool:
        return self.pos_embed in ("rope", "sincos_rope")

    @property
    def uses_sincos(self) -> bool:
        return self.pos_embed in ("sincos", "sincos_rope")

    @property
    def adaln_chunks(self) -> int:
        """Modulation vectors per block: shift, scale, gate for attention and MLP; 4 without the shifts."""
        return 6 if self.adaln_shift else 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def attention_kind(self) -> str:
        """dense or blockwise: model.attention with auto resolved by the token count."""
        if self.attention != "auto":
            return self.attention
        return "blockwise" if self.num_tokens > BLOCKWISE_ABOVE_TOKENS else "dense"

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        gelu_hidden = int(self.hidden_size * self.mlp_ratio)
        if self.mlp == "gelu":
            return gelu_hidden
        # SwiGLU has three matrices instead of two: 2/3 of the width keeps the weight count equal.
        return self.swiglu_hidden or -(-(2 * gelu_hidden // 3) // 64) * 64


def dit_config(name: str = "S/2", **overrides) -> ModelConfig:
    """A named DiT size such as "S/2" or "XL/2" as a ModelConfig, with optional field overrides."""
    size, _, patch = name.partition("/")
    if size not in DIT_SIZES or not patch.isdigit():
        raise ConfigError(f"unknown DiT size {name!r}; use one of S, B, L, XL with a patch, such as 'S/2'.")
    depth, hidden, heads = DIT_SIZES[size]
    fields = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
    return ModelConfig(**{**fields, **overrides})


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; defaults are the DiT paper's (AdamW, lr 1e-4 constant, batch 256, EMA 0.9999)."""

    steps: int = 400_000
    batch_size: int = 256  # global, over all devices of all processes
    grad_accum: int | str = "auto"  # microbatches per optimizer step; auto: the fewest whose step fits the device
    lr: float = 1e-4
    schedule: str = "constant"  # constant | cosine (to 0 at `steps`), after `warmup_steps` of linear warmup
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # global-norm clipping; 0 turns it off (DiT uses none)
    ema_decay: float = 0.9999
    seed: int = 0
    objective: str = "ddpm"  # ddpm: DiT's hybrid loss; flow: SiT's linear interpolant, velocity
    time_sampling: str = "uniform"  # flow only: uniform | logit_normal
    cosine_loss: float = 0.0  # flow only: weight of LightningDiT's velocity-direction loss (it uses 1; 0 off)
    # REPA: align the tokens after block `repa_block` (0: a third of the depth), through a training-only MLP
    # projector of width repa_projector_dim, with DINOv2 features of the clean image stored in the latent
    # cache (`dit.data.extract --repa-encoder`); the loss adds repa_weight x (minus their cosine). REPA: 0.5.
    repa_weight: float = 0.0
    repa_block: int = 0
    repa_projector_dim: int = 2048
    repa_target_dim: int = 768  # width of the target features: DINOv2-B's
    ckpt_every: int = 10_000
    keep_checkpoints: int = 3  # the last N are kept ...
    keep_every: int = 0  # ... plus every K-th step for good (0: none)
    local_checkpoints: bool = False  # multi-host without a shared filesystem: each process keeps its own
    # The weights, the EMA and AdamW's moments split over the devices, each updating its 1/n (ZeRO stage 3;
    # dit.train.SPLIT_PARTS); auto: not on CPUs.
    split_state: bool | str = "auto"
    log_every: int = 100
    tensorboard: bool = False  # also write the logged metrics as TensorBoard events (extra: tensorboard)
    jax_smi: bool = True  # on GPUs, publish device memory for the `jax-smi` command to show live

    def __post_init__(self) -> None:
        choices = {"objective": ("ddpm", "flow"), "schedule": ("constant", "cosine"),
                   "time_sampling": ("uniform", "logit_normal")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"train.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}; set one of those."
                )
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "keep_checkpoints", "repa_projector_dim",
                     "repa_target_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be a positive integer.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must lie in [0, 1).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr={self.lr} must be a finite number > 0, such as DiT's 1e-4.")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ConfigError(f"train.adam_eps={self.adam_eps} must be a finite number > 0, such as 1e-8.")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must lie in [0, 1); AdamW's are 0.9 and 0.999.")
        for name, off in (("warmup_steps", "no warmup"), ("keep_every", "keep none for good"),
                          ("weight_decay", "no decay"), ("grad_clip", "no clipping"), ("cosine_loss", "none"),
                          ("repa_weight", "no REPA"), ("repa_block", "a third of the depth")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"train.{name}={value} must be a finite number >= 0 (0: {off}).")
        if self.cosine_loss and self.objective != "flow":
            raise ConfigError(
                f"train.cosine_loss={self.cosine_loss} is a term of the flow objective's velocity loss, but "
                f"train.objective={self.objective}; set train.objective=flow, or train.cosine_loss=0."
            )
        if self.grad_accum != "auto" and not (isinstance(self.grad_accum, int) and self.grad_accum > 0):
            raise ConfigError(f"train.grad_accum={self.grad_accum!r} must be a positive integer or auto.")
        if self.split_state not in (True, False, "auto"):
            raise ConfigError(f"train.split_state={self.split_state!r} must be true, false or auto.")
        if isinstance(self.grad_accum, int) and self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.grad_accum={self.grad_accum} does not divide train.batch_size={self.batch_size} into equal "
                f"microbatches; choose a divisor of the batch size (or auto)."
            )

    def state_split_on(self, platform: str) -> bool:
        """Whether the state of a program compiled for `platform` is split over its devices (train.split_state)."""
        return platform not in STATE_WHOLE_ON if self.split_state == "auto" else bool(self.split_state)


@dataclass(frozen=True)
class EvalConfig:
    """Sampling and FID evaluation during and after training."""

    every: int = 50_000
    num_samples: int = 10_000  # class-balanced over all classes
    sampler: str = ""  # "" = the objective's default: ddpm -> ddpm; flow -> sde (SiT's); or ddim, euler, heun
    sampling_steps: int = 250
    ddim_eta: float = 0.0
    cfg_scale: float = 1.0
    guided_channels: int = 3  # DiT guides the first 3 latent channels; 0 guides all of them
    guidance_low: float = 0.0  # guidance acts only at noise levels in [low, high] (fractions of the
    guidance_high: float = 1.0  # objective's time axis, 1 = pure noise): the guidance interval
    timestep_shift: float = 0.0  # flow ODE samplers: LightningDiT's time shift s*t/(1+(s-1)t) (it uses 0.3; 0 off)
    batch_size: int = 64  # global sampling batch
    metric: str = "fid"  # fid: FID-N with the FID Inception; fd_digits: the demo's classifier features
    reference: str = ""  # fid: reference statistics from `python -m dit.eval.ref_stats`
    inception: str = ""  # fid: the Inception weights; "" = the cached pytorch-fid download

    def __post_init__(self) -> None:
        if self.metric not in ("fid", "fd_digits"):
            raise ConfigError(f"eval.metric={self.metric!r} is not one of fid, fd_digits.")
        for name in ("every", "num_samples", "sampling_steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be a positive integer.")
        known = [name for samplers in SAMPLERS.values() for name in samplers]
        if self.sampler and self.sampler not in known:
            raise ConfigError(f"eval.sampler={self.sampler!r} is not one of {', '.join(known)}.")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            raise ConfigError("eval.guidance_low and eval.guidance_high must satisfy 0 <= low <= high <= 1.")
        for name, meaning in (("ddim_eta", "0: deterministic DDIM, 1: as DDPM"),
                              ("cfg_scale", "1: no guidance"), ("guided_channels", "0: all channels"),
                              ("timestep_shift", "0: none")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"eval.{name}={value} must be a finite number >= 0 ({meaning}).")


@dataclass(frozen=True)
class DataConfig:
    """Where training batches come from: a latent cache (fast), or images encoded on the fly."""

    cache: str = ""  # latent cache directory from `python -m dit.data.extract`; "" = the preset's
    builtin: str = ""  # "digits": the built-in digits, built at `cache` (at `resolution`) on first use; "": your data
    images: str = ""  # on-the-fly instead of a cache: a dataset root whose images are encoded each step
    vae: str = "stabilityai/sd-vae-ft-ema"  # the autoencoder for on-the-fly encoding and for decoding samples
    resolution: int = 256  # on-the-fly center crop
    # On the fly only: grain processes decoding images (0: in the training process). A cache is read
    # a batch at a time by one thread, which keeps up without them.
    workers: int = 0
    flip: bool = True  # random horizontal flips, DiT's augmentation; off where a mirror image is another thing

    def __post_init__(self) -> None:
        if self.workers < 0 or self.resolution <= 0:
            raise ConfigError("data.workers must be >= 0 and data.resolution positive.")
        if self.builtin not in ("", "digits"):
            raise ConfigError(f"data.builtin={self.builtin!r}: the built-in dataset is 'digits'; leave data.builtin "
                              f"empty to train on your own data.cache or data.images.")
        if self.builtin and not self.cache:
            raise ConfigError(f"data.builtin={self.builtin} needs data.cache, the directory its cache is built in.")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: what `ablations/run.py` resolves and saves as config.json."""

    variant: str = "baseline"
    preset: str = "in100"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_sampler(self.train.objective, self.eval.sampler)
        if self.train.repa_weight and not 0 < self.repa_block <= self.model.depth:
            raise ConfigError(
                f"train.repa_block={self.train.repa_block} must name a block of the model's {self.model.depth} "
                f"(1 to {self.model.depth}), or be 0 for a third of the depth."
            )
        if self.train.repa_weight and self.data.flip:
            raise ConfigError(
                "train.repa_weight > 0 aligns tokens with DINOv2 features of the unflipped image, so a flipped "
                "latent would be aligned with the wrong features; set data.flip=false (REPA trains without flips)."
            )
        sampler = self.eval.sampler or SAMPLERS[self.train.objective][0]
        if self.eval.timestep_shift and sampler not in ("euler", "heun"):
            raise ConfigError(
                f"eval.timestep_shift={self.eval.timestep_shift} shifts the time grid of the flow ODE samplers "
                f"(euler, heun), as LightningDiT does, but the sampler is {sampler}; set eval.sampler=euler or "
                f"heun (with train.objective=flow), or eval.timestep_shift=0."
            )


    @property
    def repa_block(self) -> int:
        """The number of blocks before the REPA alignment: train.repa_block, or a third of the depth."""
        return self.train.repa_block or max(1, self.model.depth // 3)


def check_sampler(objective: str, sampler: str) -> None:
    """Raises ConfigError when eval.sampler is not one of the objective's samplers ("" always fits)."""
    allowed = SAMPLERS[objective]
    if sampler and sampler not in allowed:
        raise ConfigError(
            f"eval.sampler={sampler!r} does not fit train.objective={objective}, whose samplers are "
            f"{', '.join(allowed)}; set eval.sampler to one of those, or to nothing (--set eval.sampler=) for "
            f"the objective's default, {allowed[0]}."
        )


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(saved: dict) -> RunConfig:
    """The RunConfig of a saved config.json; keys it does not know (run records such as `params`) are
    ignored, and fields it lacks take their defaults, so older runs still load."""
    sections = {}
    for f in dataclasses.fields(RunConfig):
        value = saved.get(f.name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            kind = f.default_factory
            known = {g.name for g in dataclasses.fields(kind)}
            sections[f.name] = kind(**{k: v for k, v in (value or {}).items() if k in known})
        elif value is not None:
            sections[f.name] = value
    return RunConfig(**sections)


def _parse_value(key: str, text: str, kind: str):
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool | str":  # true/false or a named choice such as auto
            return text if text == "auto" else _parse_value(key, text, "bool")
        if kind == "int | str":  # an integer or a named choice such as auto
            return int(text) if text.lstrip("-").isdigit() else text
        return text
    except ValueError:
        raise ConfigError(f"--set {key}={text}: {text!r} is not a valid {kind}; give a value of type {kind}.") from None


def apply_overrides(config: RunConfig, assignments: list[str]) -> RunConfig:
    """Applies `section.field=value` strings (as given to --set) to a RunConfig, checking names and types.

    Every assignment is parsed first and the config is built once from the final values, so checks across
    fields (train.grad_accum divides train.batch_size, eval.sampler fits train.objective) do not depend on
    the order of the --set options."""
    sections = {f.name: f for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))}
    changes: dict[str, dict] = {}
    for assignment in assignments:
        key, eq, text = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot:
            raise ConfigError(f"--set {assignment!r} is not of the form section.field=value, e.g. model.depth=13.")
        if section not in sections:
            raise ConfigError(f"--set {key}: unknown section {section!r}; sections are {', '.join(sections)}.")
        sub = getattr(config, section)
        kinds = {f.name: str(f.type) for f in dataclasses.fields(sub)}
        if name not in kinds:
            close = difflib.get_close_matches(name, kinds, n=1)
            hint = f" Did you mean {section}.{close[0]}?" if close else ""
            raise ConfigError(
                f"--set {key}: {section} has no field {name!r}; its fields are {', '.join(kinds)}.{hint}"
            )
        changes.setdefault(section, {})[name] = _parse_value(key, text.strip(), kinds[name])
    built = {section: dataclasses.replace(getattr(config, section), **fields) for section, fields in changes.items()}
    return dataclasses.replace(config, **built)
