"""An independent NumPy (float64) forward of the official DiT, written from the paper and the official
key layout, used as the parity reference for our JAX model and its checkpoint import.

It reads torch-layout weights (Linear (out, in), Conv2d (out, in, kh, kw)), works in NCHW like the
official code, and shares no code with `dit/`.
"""

from __future__ import annotations

import math

import numpy as np


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE/DiT get_2d_sincos_pos_embed: width coordinate in the first half, height in the second."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w_coord, h_coord = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_axis(dim // 2, w_coord), one_axis(dim // 2, h_coord)], axis=1)


def random_state_dict(*, depth: int, hidden: int, patch: int, in_channels: int, input_size: int,
                      num_classes: int, mlp_ratio: float = 4.0, learn_sigma: bool = True, seed: int = 0,
                      ) -> dict[str, np.ndarray]:
    """Official-layout weights, random and non-zero everywhere (adaLN and final layer included)."""
    rng = np.random.default_rng(seed)
    out_channels = in_channels * (2 if learn_sigma else 1)
    mlp = int(hidden * mlp_ratio)

    def linear(name, fan_out, fan_in):
        sd[f"{name}.weight"] = rng.normal(0, 1 / math.sqrt(fan_in), (fan_out, fan_in)).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, (fan_out,)).astype(np.float32)

    sd: dict[str, np.ndarray] = {}
    grid = input_size // patch
    sd["pos_embed"] = sincos_2d(hidden, grid)[None].astype(np.float32)
    fan_in = in_channels * patch * patch
    sd["x_embedder.proj.weight"] = rng.normal(0, 1 / math.sqrt(fan_in), (hidden, in_channels, patch, patch)).astype(np.float32)
    sd["x_embedder.proj.bias"] = rng.normal(0, 0.1, (hidden,)).astype(np.float32)
    linear("t_embedder.mlp.0", hidden, 256)
    linear("t_embedder.mlp.2", hidden, hidden)
    sd["y_embedder.embedding_table.weight"] = rng.normal(0, 1, (num_classes + 1, hidden)).astype(np.float32)
    for i in range(depth):
        linear(f"blocks.{i}.attn.qkv", 3 * hidden, hidden)
        linear(f"blocks.{i}.attn.proj", hidden, hidden)
        linear(f"blocks.{i}.mlp.fc1", mlp, hidden)
        linear(f"blocks.{i}.mlp.fc2", hidden, mlp)
        linear(f"blocks.{i}.adaLN_modulation.1", 6 * hidden, hidden)
    linear("final_layer.linear", patch * patch * out_channels, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return sd


def _lin(sd, name, x):
    return x @ sd[f"{name}.weight"].astype(np.float64).T + sd[f"{name}.bias"]


def _silu(x):
    return x / (1 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def forward(sd: dict[str, np.ndarray], x: np.ndarray, t: np.ndarray, y: np.ndarray, num_heads: int) -> np.ndarray:
    """x (N, C, H, W) -> (N, out_C, H, W), in float64, as the official DiT.forward in eval mode."""
    x = x.astype(np.float64)
    n, c, h, w = x.shape
    wconv = sd["x_embedder.proj.weight"].astype(np.float64)
    hidden, _, p, _ = wconv.shape
    patches = x.reshape(n, c, h // p, p, w // p, p)
    tokens = np.einsum("nchpwq,dcpq->nhwd", patches, wconv) + sd["x_embedder.proj.bias"]
    tokens = tokens.reshape(n, -1, hidden) + sd["pos_embed"].astype(np.float64)

    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.astype(np.float64)[:, None] * freqs[None]
    t_freq = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    t_emb = _lin(sd, "t_embedder.mlp.2", _silu(_lin(sd, "t_embedder.mlp.0", t_freq)))
    cond = t_emb + sd["y_embedder.embedding_table.weight"].astype(np.float64)[y]

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    head_dim = hidden // num_heads
    for i in range(depth):
        b = f"blocks.{i}"
        mods = np.split(_lin(sd, f"{b}.adaLN_modulation.1", _silu(cond)), 6, axis=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        hmod = _modulate(_layer_norm(tokens), shift_msa, scale_msa)
        qkv = _lin(sd, f"{b}.attn.qkv", hmod).reshape(n, -1, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = scores / scores.sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(n, -1, hidden)
        tokens = tokens + gate_msa[:, None] * _lin(sd, f"{b}.attn.proj", out)
        hmod = _modulate(_layer_norm(tokens), shift_mlp, scale_mlp)
        mlp = _lin(sd, f"{b}.mlp.fc2", _gelu_tanh(_lin(sd, f"{b}.mlp.fc1", hmod)))
        tokens = tokens + gate_mlp[:, None] * mlp

    shift, scale = np.split(_lin(sd, "final_layer.adaLN_modulation.1", _silu(cond)), 2, axis=1)
    out = _lin(sd, "final_layer.linear", _modulate(_layer_norm(tokens), shift, scale))
    out_c = out.shape[-1] // (p * p)
    g = h // p
    out = out.reshape(n, g, g, p, p, out_c)
    return np.einsum("nhwpqc->nchpwq", out).reshape(n, out_c, g * p, g * p)
