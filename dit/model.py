"""The Diffusion Transformer (Peebles & Xie, 2022) in Flax NNX, with the ablation switches of ModelConfig.

Reads top to bottom: the block, the final layer, the model, the guided call. Inputs and outputs are
NHWC; with learn_sigma the output has 2x the input channels (epsilon, then the sigma interpolation).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dit.attention import SelfAttention, rope_2d_angles
from dit.config import SCAN_BLOCKS_ON, ModelConfig
from dit.guidance import guide
from dit.layers import (ConvStem, GeluMlp, LabelEmbedder, Norm, PatchEmbed, SwiGluMlp, TimestepEmbedder, linear,
                        modulate, normal_002, round_gradient, sincos_pos_embed_2d, unpatchify, zeros)


class DiTBlock(nnx.Module):
    """Pre-norm transformer block whose norms are modulated by the conditioning (adaLN-Zero).

    With the shared adaLN (adaLN-single), the block owns only a learned offset that is added to the
    modulation computed once for all blocks. Without adaln_shift the modulation has no shifts
    (LightningDiT's wo_shift): scale and gate for attention, then for the MLP.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        dtype = jnp.dtype(cfg.dtype)
        self.shifted = cfg.adaln_shift
        # The residual stream is float32 in the forward pass whatever the compute dtype; with bfloat16 compute its
        # gradient, which each of the block's backward fusions reads or writes whole, is rounded to bfloat16 where
        # it enters the block's two sums. Measured 2026-12-07, DiT-S/2 in bfloat16 (TPU v3-8 cost model, batch
        # 256): the step 32.91 -> 31.71 ms, 12.03 -> 11.51 GB moved per core, the same memory; one step's gradient
        # error against float32 0.2761% -> 0.2762% (rope_swiglu 0.2646% -> 0.2659%); patch1, with the weights
        # split (dit.train.SPLIT_PARTS), 261.3 -> 256.5 ms and 7.00 -> 6.85 GB per core. float16 keeps float32
        # gradients (its range ends at 65504).
        self.gradient_dtype = jnp.bfloat16 if dtype == jnp.bfloat16 else None
        self.norm1 = Norm(cfg.norm, d, cfg.norm_weight)
        self.norm2 = Norm(cfg.norm, d, cfg.norm_weight)
        self.attn = SelfAttention(d, cfg.num_heads, rngs, dtype, qk_norm=cfg.qk_norm, attention=cfg.attention_kind,
                                  block_size=cfg.attention_block)
        mlp = SwiGluMlp if cfg.mlp == "swiglu" else GeluMlp
        self.mlp = mlp(d, cfg.mlp_hidden, rngs, dtype)
        n = cfg.adaln_chunks
        if cfg.adaln == "per_block":
            # Zero init: every block starts as the identity, the "Zero" of adaLN-Zero.
            self.adaln_modulation = linear(d, n * d, rngs, dtype, init=zeros)
            self.adaln_offset = None
        else:
            # PixArt-alpha's per-block scale_shift_table, randn(6, d) / sqrt(d), flattened in the same order.
            self.adaln_modulation = None
            self.adaln_offset = nnx.Param(jax.random.normal(rngs.params(), (n * d,), jnp.float32) / math.sqrt(d))

    def _round_residual_gradient(self, x):
        return x if self.gradient_dtype is None else round_gradient(x, self.gradient_dtype)

    def __call__(self, x, c, shared_modulation=None, rope_angles=None):
        # The named scopes label the compiled program's operations (profiles, dit.bench compile).
        with jax.named_scope("adaln"):
            if self.adaln_modulation is not None:
                modulation = self.adaln_modulation(nnx.silu(c))
            else:
                modulation = shared_modulation + self.adaln_offset[...]
        if self.shifted:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
        else:
            scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(modulation, 4, axis=-1)
            shift_msa = shift_mlp = None
        with jax.named_scope("attention"):
            x = self._round_residual_gradient(x)
            x = x + gate_msa[:, None, :] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope_angles)
        with jax.named_scope("mlp"):
            x = self._round_residual_gradient(x)
            return x + gate_mlp[:, None, :] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def stack_blocks(blocks: list[DiTBlock]) -> DiTBlock:
    """The blocks as one module whose every parameter has a leading depth axis, for lax.scan.

    Each block is made on its own first, in order from one Rngs, so every block gets the official
    initialisation and the random stream (hence every seed's initial weights) is that of a plain list.
    """
    block_def, _ = nnx.split(blocks[0])
    return nnx.merge(block_def, jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in blocks)))


# Rematerialisation per block (model.remat): `block` keeps only each block's input and recomputes the
# rest in the backward pass; `dots` also keeps the outputs of the products with weight matrices (no
# batch dimensions), and recomputes attention's token-by-token products, norms and activations.
REMAT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# What a scanned block keeps with remat `none`: the weight products' outputs and what FlashAttention's
# backward needs besides q, k, v (its output and log-sum-exp; the CPU's attention names its output too,
# which the output projection's backward reads), recomputing the elementwise work (norms, modulation,
# activations, the CPU attention's softmax) inside the backward's fusions, as XLA does by itself for the
# unrolled loop.
# Without a policy the scan keeps every intermediate: 2.9x the unrolled step's temporaries on a TPU v3
# (4.79 against 1.68 GB for DiT-S/2, bfloat16, 32 per core).
SCANNED_RESIDUALS = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"))


class FinalLayer(nnx.Module):
    """adaLN-modulated norm (model.final_norm), then a linear map from each token to its patch of output channels.

    It keeps its own adaLN linear with adaLN-single too: PixArt-alpha's final layer instead adds a learned
    (2, d) table to the timestep embedding, without a linear.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        dtype = jnp.dtype(cfg.dtype)
        self.norm_final = Norm(cfg.final_norm, d, cfg.norm_weight)
        self.adaln_modulation = linear(d, 2 * d, rngs, dtype, init=zeros)
        self.linear = linear(d, cfg.patch_size**2 * cfg.out_channels, rngs, dtype, init=zeros)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.adaln_modulation(nnx.silu(c)), 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nnx.Module):
    """A class-conditional latent diffusion transformer: model(x, t, y) -> (B, H, W, out_channels)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        dtype = jnp.dtype(cfg.dtype)
        if cfg.stem == "conv":
            self.x_embedder = ConvStem(cfg.patch_size, cfg.in_channels, d, cfg.conv_stem_width, rngs, dtype)
        else:
            self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d, rngs, dtype)
        self.t_embedder = TimestepEmbedder(d, rngs, dtype)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob, rngs)
        # PixArt-alpha's t_block: N(0, 0.02), so with the per-block tables no block starts as the identity;
        # the zero final layer still makes the initial output zero.
        self.shared_adaln = (linear(d, cfg.adaln_chunks * d, rngs, dtype, init=normal_002)
                             if cfg.adaln == "shared" else None)
        self.blocks = stack_blocks([DiTBlock(cfg, rngs) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg, rngs)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, dropout_key: jax.Array | None = None,
                 tokens_after: int = 0):
        """x (B, H, W, C) latents, t (B,) timesteps, y (B,) labels (num_classes = null).

        Labels are dropped to the null label only when `dropout_key` is given (training). With
        tokens_after = k > 0, returns (output, the float32 (B, T, D) residual stream after the first k
        blocks): what REPA aligns with its target features.
        """
        cfg = self.cfg
        # The residual stream stays float32 whatever the compute dtype (as autocast keeps it in PyTorch);
        # only the inputs of the products are cast down.
        h = self.x_embedder(x.astype(jnp.float32)).astype(jnp.float32)
        if cfg.uses_sincos:
            h = h + jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size))
        rope_angles = jnp.asarray(rope_2d_angles(cfg.grid_size, cfg.head_dim)) if cfg.uses_rope else None
        c = self.t_embedder(t) + self.y_embedder(y, dropout_key)
        shared = self.shared_adaln(nnx.silu(c)) if self.shared_adaln is not None else None
        block_def, stacked = nnx.split(self.blocks)

        def run_blocks(h, scan: bool):
            def run_block(h, block_state):
                return nnx.merge(block_def, block_state)(h, c, shared, rope_angles), None

            policy = REMAT_POLICIES.get(cfg.remat, SCANNED_RESIDUALS if scan else None)
            if policy is not None:
                run_block = jax.checkpoint(run_block, policy=policy)

            def run(h, start, stop):  # blocks start .. stop - 1
                part = jax.tree.map(lambda a: a[start:stop], stacked)
                return jax.lax.scan(run_block, h, part, unroll=1 if scan else stop - start)[0]

            if not tokens_after:
                return run(h, 0, cfg.depth), None
            tokens = run(h, 0, tokens_after)
            return run(tokens, tokens_after, cfg.depth), tokens

        if cfg.scan_blocks == "auto":
            # Decided when the program is lowered, for the platform it is compiled for (a TPU topology
            # compiled on a CPU host included): one lax.scan on the CPU, where without the loop boundary XLA
            # fuses the residual stream across all blocks and recomputes it in every consumer (the scanned
            # step trains DiT-S/2 about 1.5x faster there); written out on accelerators, where XLA's cost
            # model puts the unrolled TPU v3 step at half the scanned one's time.
            scanned = {platform: functools.partial(run_blocks, scan=True) for platform in SCAN_BLOCKS_ON}
            h, tokens = jax.lax.platform_dependent(h, **scanned, default=functools.partial(run_blocks, scan=False))
        else:
            h, tokens = run_blocks(h, bool(cfg.scan_blocks))
        out = unpatchify(self.final_layer(h, c), cfg.patch_size, cfg.out_channels).astype(jnp.float32)
        return (out, tokens) if tokens_after else out

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = 3):
        """Classifier-free guidance as DiT's forward_with_cfg.

        The batch holds the conditional half first and the same inputs with null labels second; both
        halves get the guided output. Guidance acts on the first `guided_channels` output channels
        (3, as DiT; None for all predicted channels, as SiT); the rest, such as the learned sigma, pass
        through unguided.
        """
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half]), t, y)
        n = self.cfg.in_channels if guided_channels is None else guided_channels
        guided = guide(*jnp.split(out, 2, axis=0), cfg_scale, n)[..., :n]
        return jnp.concatenate([jnp.concatenate([guided, guided]), out[..., n:]], axis=-1)
