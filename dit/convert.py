"""Import of facebookresearch/DiT and hustvl/LightningDiT checkpoints (any size) into our DiT.

Both layouts are torch's: Linear weights are (out, in), the patch embedding is a Conv2d with
kernel = stride = patch. Our Linear kernels are (in, out) and our patchify flattens each patch as
(row, column, channel), so the conv weight (out, in, kh, kw) becomes a (kh*kw*in, out) kernel.

LightningDiT's rotary embedding (EVA's) rotates neighbouring channels (2i, 2i + 1) of a head together,
ours the two halves (i, i + D/2), with the same angle for pair i. The import reorders each head's q and k
channels to our pairing; a q.k product does not change when both are reordered alike, so the model's
function is exactly the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit.attention import rope_2d_angles
from dit.config import DIT_SIZES, ModelConfig
from dit.errors import UserError
from dit.layers import sincos_pos_embed_2d
from dit.model import DiT

# The official sizes fix the head count, which shapes alone cannot tell.
_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}
# LightningDiT's sizes add 1p0B and 1p6B (models/lightningdit.py); a RoPE or QK-norm checkpoint shows its head size.
_LIGHTNING_HEADS_BY_WIDTH = {**_HEADS_BY_WIDTH, 1536: 24, 1792: 28}
_OFFICIAL_LAYOUT = "shared/reference/official-dit-s2-in100.keys.tsv"
_LIGHTNING_LAYOUT = "tests/reference/lightningdit-s2-in100.keys.tsv"


class CheckpointError(UserError):
    pass


def _read(path: Path) -> Mapping:
    if path.suffix == ".npz":
        return dict(np.load(path))
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"reading {path} needs PyTorch, which is not installed; install it (pip install torch) or pass "
            f"a dict of numpy arrays with the official keys instead."
        ) from None
    # weights_only: tensors and plain containers only, no pickled code is executed.
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _state_dict(path_or_state_dict) -> dict[str, np.ndarray]:
    if isinstance(path_or_state_dict, (str, Path)):
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint file at {path}; give the path of a DiT .pt file.")
        raw = _read(path)
    else:
        raw = path_or_state_dict
    # Training checkpoints of the official train.py hold {"model", "ema", "opt", "args"}; the paper's
    # numbers all use the EMA weights, so prefer them.
    for key in ("ema", "model"):
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    return {k.removeprefix("module."): _to_numpy(v) for k, v in raw.items()}


def _shared_fields(sd: Mapping[str, np.ndarray], num_classes: int, source: str, layout: str,
                   required: tuple[str, ...]) -> dict:
    """The ModelConfig fields that DiT and LightningDiT state dicts show the same way."""
    required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight", *required)
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(
            f"this is not a {source} state dict: keys {', '.join(missing)} are missing (see {layout} for the layout)."
        )
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    if rows != num_classes + 1:
        raise CheckpointError(
            f"the checkpoint's label table has {rows} rows, but num_classes={num_classes} needs "
            f"{num_classes + 1} (the classes and the null label); pass num_classes={rows - 1}."
        )
    if "pos_embed" in sd:
        input_size = math.isqrt(sd["pos_embed"].shape[1]) * patch
    else:
        raise CheckpointError("the checkpoint has no pos_embed, so its latent size is unknown.")
    out_channels = sd["final_layer.linear.weight"].shape[0] // patch**2
    return dict(input_size=input_size, in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
                num_classes=num_classes, learn_sigma=out_channels == 2 * in_channels)


def infer_config(sd: Mapping[str, np.ndarray], num_classes: int, num_heads: int | None = None) -> ModelConfig:
    """The ModelConfig that the official state dict's shapes describe."""
    fields = _shared_fields(sd, num_classes, "facebookresearch/DiT", _OFFICIAL_LAYOUT, ("blocks.0.mlp.fc1.weight",))
    hidden = fields["hidden_size"]
    heads = num_heads or _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
    return ModelConfig(**fields, num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden)


def infer_lightning_config(sd: Mapping[str, np.ndarray], num_classes: int, num_heads: int | None = None
                           ) -> ModelConfig:
    """The ModelConfig that a LightningDiT state dict's keys and shapes describe (its use_* switches included)."""
    fields = _shared_fields(sd, num_classes, "hustvl/LightningDiT", _LIGHTNING_LAYOUT,
                            ("blocks.0.adaLN_modulation.1.weight",))
    hidden = fields["hidden_size"]
    if "blocks.0.attn.q_norm.bias" in sd:
        raise CheckpointError(
            "this LightningDiT was trained with use_qknorm but without use_rmsnorm, so its QK-norm is a LayerNorm "
            "with a bias, which our model does not have (its QK-norm is an RMSNorm with a weight, LightningDiT's "
            "with use_rmsnorm); only checkpoints without QK-norm or with both switches on can be imported."
        )
    rope = "feat_rope.freqs_cos" in sd
    head_dim = (sd["feat_rope.freqs_cos"].shape[-1] if rope else
                sd["blocks.0.attn.q_norm.weight"].shape[0] if "blocks.0.attn.q_norm.weight" in sd else None)
    heads = num_heads or (hidden // head_dim if head_dim else
                          _LIGHTNING_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)))
    swiglu = "blocks.0.mlp.w12.weight" in sd
    gelu_width = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * hidden
    rmsnorm = "blocks.0.norm1.weight" in sd  # use_rmsnorm: an RMSNorm with a weight in the blocks and the final layer
    cfg = ModelConfig(
        **fields, num_heads=heads, mlp_ratio=gelu_width / hidden, pos_embed="sincos_rope" if rope else "sincos",
        mlp="swiglu" if swiglu else "gelu", norm="rmsnorm" if rmsnorm else "layernorm",
        final_norm="rmsnorm" if rmsnorm else "layernorm", norm_weight=rmsnorm,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        adaln_shift=sd["blocks.0.adaLN_modulation.1.weight"].shape[0] != 4 * hidden,  # wo_shift: 4 chunks, not 6
    )
    if swiglu and cfg.mlp_hidden != sd["blocks.0.mlp.w12.weight"].shape[0] // 2:
        cfg = dataclasses.replace(cfg, swiglu_hidden=sd["blocks.0.mlp.w12.weight"].shape[0] // 2)
    return cfg


def _path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def _our_param(official_key: str, value: np.ndarray) -> tuple[tuple, np.ndarray]:
    """Our parameter path and value for one official key."""
    if official_key == "x_embedder.proj.weight":
        out, cin, kh, kw = value.shape
        return ("x_embedder", "proj", "kernel"), value.transpose(2, 3, 1, 0).reshape(kh * kw * cin, out)
    if official_key == "y_embedder.embedding_table.weight":
        return ("y_embedder", "embedding_table", "embedding"), value
    key = official_key.replace("adaLN_modulation.1", "adaln_modulation")
    key = key.replace("t_embedder.mlp.0", "t_embedder.mlp_in").replace("t_embedder.mlp.2", "t_embedder.mlp_out")
    *path, leaf = _path(key)
    if leaf == "weight":
        return (*path, "kernel"), value.T
    return (*path, leaf), value


def _lightning_param(key: str, value: np.ndarray, cfg: ModelConfig) -> tuple[tuple, np.ndarray]:
    """Our parameter path and value for one LightningDiT key; the rest of its layout is the official one."""
    if cfg.uses_rope and re.search(r"attn\.(qkv\.weight|qkv\.bias|[qk]_norm\.weight)$", key):
        value = _rope_halves(value, cfg)
    if key.endswith(("norm1.weight", "norm2.weight", "norm_final.weight")):
        return _path(key), value  # our Norm's weight: the same name and layout
    if key.endswith(("q_norm.weight", "k_norm.weight")):
        return _path(key.replace("_norm.weight", "_scale")), value
    return _our_param(key.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2."), value)


def _rope_halves(value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """q and k channels of every head reordered from EVA's RoPE pairs (2i, 2i + 1) to ours (i, i + D/2).

    `value` is the qkv weight (3 * width, width) or bias (3 * width,), whose v third stays as it is, or
    a QK-norm weight (head_dim,).
    """
    d = cfg.head_dim
    order = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])  # our channel c is EVA's channel order[c]
    if value.shape == (d,):
        return value[order]
    qkv = value.reshape(3, cfg.num_heads, d, *value.shape[1:]).copy()
    qkv[:2] = qkv[:2, :, order]
    return qkv.reshape(value.shape)


def _check_pos_embed(value: np.ndarray, cfg: ModelConfig) -> None:
    ours = sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)
    if value.size != ours.size or np.abs(value.reshape(ours.shape) - ours).max() > 1e-4:
        raise CheckpointError("the checkpoint's pos_embed is not DiT's fixed 2D sin-cos embedding.")


def _check_rope_tables(cos: np.ndarray | None, sin: np.ndarray | None, cfg: ModelConfig) -> None:
    """LightningDiT's fixed feat_rope tables must be the rotation our attention applies (after _rope_halves)."""
    # EVA's tables hold each channel's angle, channel 2i and 2i + 1 both pair i's: ours repeated twice.
    angles = np.repeat(rope_2d_angles(cfg.grid_size, cfg.head_dim), 2, axis=1)
    for name, table, ours in (("freqs_cos", cos, np.cos(angles)), ("freqs_sin", sin, np.sin(angles))):
        if table is None:
            raise CheckpointError(f"the checkpoint has feat_rope tables but lacks feat_rope.{name}.")
        if table.shape != ours.shape or np.abs(table - ours).max() > 1e-4:
            raise CheckpointError(
                f"the checkpoint's feat_rope.{name} is not the 2D rotary table that LightningDiT builds for a "
                f"{cfg.grid_size}x{cfg.grid_size} grid and head size {cfg.head_dim} (theta 10000), so its RoPE is "
                f"not one this import reproduces; if you passed num_heads, check it (the table's head size is "
                f"{table.shape[-1]})."
            )


def load_official_dit(path_or_state_dict, num_classes: int, num_heads: int | None = None) -> DiT:
    """A DiT built from an official checkpoint (a .pt path or a dict of arrays), any size.

    Call it as model(x, t, y) with x float32 (B, H, W, C); it returns (B, H, W, 2C) with learned sigma.
    Without a dropout key there is no label dropout (inference mode).
    """
    sd = _state_dict(path_or_state_dict)
    cfg = infer_config(sd, num_classes, num_heads)
    _check_pos_embed(sd.pop("pos_embed"), cfg)
    return _load(sd, cfg, _our_param, "DiT")


def load_lightning_dit(path_or_state_dict, num_classes: int, num_heads: int | None = None) -> DiT:
    """Our DiT built from a hustvl/LightningDiT checkpoint (models/lightningdit.py; a .pt path or a dict of
    arrays), any size and any of its use_* switches, except QK-norm without RMSNorm.

    Call it as model(x, t, y) with x float32 (B, H, W, C); it returns (B, H, W, C) for LightningDiT's
    default learn_sigma=False. A checkpoint trained with learn_sigma returns 2C channels: LightningDiT's
    forward drops the second C, ours keeps them (as load_official_dit). No label dropout.
    """
    sd = _state_dict(path_or_state_dict)
    cfg = infer_lightning_config(sd, num_classes, num_heads)
    _check_pos_embed(sd.pop("pos_embed"), cfg)
    if cfg.uses_rope:
        _check_rope_tables(sd.pop("feat_rope.freqs_cos"), sd.pop("feat_rope.freqs_sin", None), cfg)
    return _load(sd, cfg, lambda key, value: _lightning_param(key, value, cfg), "LightningDiT")


def _load(sd: Mapping[str, np.ndarray], cfg: ModelConfig,
          our_param: Callable[[str, np.ndarray], tuple[tuple, np.ndarray]], source: str) -> DiT:
    """Our DiT of `cfg` holding every array of `sd` (its fixed tables already checked and removed)."""
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))  # shapes only: every value is replaced
    expected = {path: var.shape for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    arrays = {}
    per_block: dict[tuple, dict[int, np.ndarray]] = {}  # our stacked path -> block index -> that block's array
    for their_key, value in sd.items():
        path, array = our_param(their_key, value)
        # ("blocks", i, ...): our blocks hold one array per name with a leading depth axis.
        stacked, index = (path[:1] + path[2:], path[1]) if path[0] == "blocks" else (path, None)
        if stacked not in expected:
            raise CheckpointError(f"unexpected key {their_key!r} in the checkpoint: not part of a {source}.")
        shape = expected[stacked] if index is None else expected[stacked][1:]
        if array.shape != shape:
            raise CheckpointError(f"{their_key} has shape {array.shape} after conversion, expected {shape}.")
        if index is None:
            arrays[path] = array
        else:
            per_block.setdefault(stacked, {})[index] = array
    for path, blocks in per_block.items():
        if len(blocks) == cfg.depth:
            arrays[path] = np.stack([blocks[i] for i in range(cfg.depth)])
    for path, array in arrays.items():
        _variable(model, path).set_value(jnp.asarray(array, jnp.float32))
    missing = sorted(_official_names(p, set(per_block.get(p, {})), cfg.depth) for p in set(expected) - set(arrays))
    if missing:
        raise CheckpointError(f"the checkpoint lacks parameters for: {', '.join(missing)}.")
    return model


def _official_names(path: tuple, present: set[int], depth: int) -> str:
    """Our parameter path as the blocks it lacks, such as blocks.3.mlp.fc1.kernel."""
    if path[0] != "blocks":
        return ".".join(map(str, path))
    rest = ".".join(map(str, path[1:]))
    return ", ".join(f"blocks.{i}.{rest}" for i in range(depth) if i not in present)


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    node = model
    for part in path:
        node = getattr(node, part)
    return node
