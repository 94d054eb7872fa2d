"""Import of facebookresearch/DiT checkpoints (any size) into our DiT.

The official layout is torch's: Linear weights are (out, in), the patch embedding is a Conv2d with
kernel = stride = patch. Our Linear kernels are (in, out) and our patchify flattens each patch as
(row, column, channel), so the conv weight (out, in, kh, kw) becomes a (kh*kw*in, out) kernel.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit.config import DIT_SIZES, ModelConfig
from dit.errors import UserError
from dit.layers import sincos_pos_embed_2d
from dit.model import DiT

# The official sizes fix the head count, which shapes alone cannot tell.
_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}


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


def infer_config(sd: Mapping[str, np.ndarray], num_classes: int, num_heads: int | None = None) -> ModelConfig:
    """The ModelConfig that the official state dict's shapes describe."""
    required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(
            f"this is not a facebookresearch/DiT state dict: keys {', '.join(missing)} are missing "
            f"(see shared/reference/official-dit-s2-in100.keys.tsv for the layout)."
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
    heads = num_heads or _HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64))
    return ModelConfig(
        input_size=input_size, in_channels=in_channels, patch_size=patch, hidden_size=hidden, depth=depth,
        num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden, num_classes=num_classes,
        learn_sigma=out_channels == 2 * in_channels,
    )


def _our_param(official_key: str, value: np.ndarray) -> tuple[tuple, np.ndarray]:
    """Our parameter path and value for one official key."""
    if official_key == "x_embedder.proj.weight":
        out, cin, kh, kw = value.shape
        return ("x_embedder", "proj", "kernel"), value.transpose(2, 3, 1, 0).reshape(kh * kw * cin, out)
    if official_key == "y_embedder.embedding_table.weight":
        return ("y_embedder", "embedding_table", "embedding"), value
    key = official_key.replace("adaLN_modulation.1", "adaln_modulation")
    key = key.replace("t_embedder.mlp.0", "t_embedder.mlp_in").replace("t_embedder.mlp.2", "t_embedder.mlp_out")
    *module, leaf = key.split(".")
    path = tuple(int(p) if p.isdigit() else p for p in module)
    if leaf == "weight":
        return path + ("kernel",), value.T
    return path + (leaf,), value


def load_official_dit(path_or_state_dict, num_classes: int, num_heads: int | None = None) -> DiT:
    """A DiT built from an official checkpoint (a .pt path or a dict of arrays), any size.

    Call it as model(x, t, y) with x float32 (B, H, W, C); it returns (B, H, W, 2C) with learned sigma.
    Without a dropout key there is no label dropout (inference mode).
    """
    sd = _state_dict(path_or_state_dict)
    cfg = infer_config(sd, num_classes, num_heads)
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))  # shapes only: every value is replaced
    expected = {path: var.shape for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    arrays = {}
    per_block: dict[tuple, dict[int, np.ndarray]] = {}  # our stacked path -> block index -> that block's array
    for official_key, value in sd.items():
        if official_key == "pos_embed":
            ours = sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)
            if np.abs(value.reshape(ours.shape) - ours).max() > 1e-4:
                raise CheckpointError("the checkpoint's pos_embed is not DiT's fixed 2D sin-cos embedding.")
            continue
        path, array = _our_param(official_key, value)
        # ("blocks", i, ...): our blocks hold one array per name with a leading depth axis.
        stacked, index = (path[:1] + path[2:], path[1]) if path[0] == "blocks" else (path, None)
        if stacked not in expected:
            raise CheckpointError(f"unexpected key {official_key!r} in the checkpoint: not part of a DiT.")
        shape = expected[stacked] if index is None else expected[stacked][1:]
        if array.shape != shape:
            raise CheckpointError(f"{official_key} has shape {array.shape} after conversion, expected {shape}.")
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
