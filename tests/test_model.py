"""Invariants of the DiT model: adaLN-Zero init, guidance, label dropout, dtypes, full-size shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ablations.presets import smoke
from dit.config import ModelConfig, RunConfig
from dit.model import DiT, DiTBlock, FinalLayer
from tests.helpers import TINY, batch, randomized
from variants.registry import FEATURES, REGISTERED, resolve


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_output_is_exactly_zero_at_init(feature):
    sizes = ("depth", "hidden_size", "num_heads", "learn_sigma")  # the tiny size, with learned sigma
    fields = {k: v for k, v in FEATURES[feature].items() if k not in sizes}
    cfg = dataclasses.replace(TINY, **fields)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    x, t, y = batch(cfg)
    out = model(x, t, y)
    assert out.shape == (4, 8, 8, 8)
    assert not np.any(np.asarray(out))


def test_randomized_model_output_is_not_zero():
    x, t, y = batch(TINY)
    assert np.abs(np.asarray(randomized(TINY)(x, t, y))).mean() > 1e-3


def test_guidance_scale_one_equals_conditional_output():
    model = randomized(TINY)
    x, t, y = batch(TINY, n=3)
    null = jnp.full_like(y, TINY.num_classes)
    guided = model.forward_with_cfg(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, null]), 1.0)
    cond, uncond = model(x, t, y), model(x, t, null)
    np.testing.assert_allclose(guided[:3], cond, rtol=1e-5, atol=1e-4)
    # As DiT: the guided channels are shared by both halves; the others keep each half's own output.
    np.testing.assert_allclose(guided[3:, ..., :3], cond[..., :3], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(guided[3:, ..., 3:], uncond[..., 3:], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("guided_channels", [3, None])
def test_guidance_extrapolates_only_the_guided_channels(guided_channels):
    model = randomized(TINY)
    x, t, y = batch(TINY, n=2)
    null = jnp.full_like(y, TINY.num_classes)
    xx, tt, yy = jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, null])
    out = model.forward_with_cfg(xx, tt, yy, 4.0, guided_channels=guided_channels)
    cond, uncond = model(x, t, y), model(x, t, null)
    n = 3 if guided_channels == 3 else TINY.in_channels
    np.testing.assert_allclose(out[:2, ..., :n], uncond[..., :n] + 4.0 * (cond[..., :n] - uncond[..., :n]),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[:2, ..., n:], cond[..., n:], rtol=1e-5, atol=1e-5)


def test_label_dropout_only_with_a_key():
    model = randomized(TINY)
    x, t, y = batch(TINY, n=64)
    null = jnp.full_like(y, TINY.num_classes)
    np.testing.assert_array_equal(model(x, t, y), model(x, t, y))
    dropped = model(x, t, y, dropout_key=jax.random.key(0))
    same_as_null = np.all(np.isclose(dropped, model(x, t, null), atol=1e-6), axis=(1, 2, 3))
    same_as_cond = np.all(np.isclose(dropped, model(x, t, y), atol=1e-6), axis=(1, 2, 3))
    assert np.all(same_as_null | same_as_cond)
    assert 1 <= same_as_null.sum() <= 20  # dropout 0.1 of 64


def test_no_label_dropout_when_probability_is_zero():
    cfg = dataclasses.replace(TINY, class_dropout_prob=0.0)
    model = randomized(cfg)
    x, t, y = batch(cfg)
    np.testing.assert_array_equal(model(x, t, y, dropout_key=jax.random.key(0)), model(x, t, y))


def test_bfloat16_compute_is_close_to_float32_and_keeps_float32_params():
    model32 = randomized(TINY)
    model16 = randomized(dataclasses.replace(TINY, dtype="bfloat16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    x, t, y = batch(TINY)
    a, b = model32(x, t, y), model16(x, t, y)
    assert b.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a)) < 0.05


def test_pos_embed_is_not_a_parameter():
    model = DiT(TINY, rngs=nnx.Rngs(0))
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any("pos" in n for n in names)


def test_full_size_dit_s2_forward_shapes_via_eval_shape():
    cfg = ModelConfig()
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y), state,
                         jax.ShapeDtypeStruct((8, 32, 32, 4), jnp.float32),
                         jax.ShapeDtypeStruct((8,), jnp.int32), jax.ShapeDtypeStruct((8,), jnp.int32))
    assert out.shape == (8, 32, 32, 8) and out.dtype == jnp.float32


def test_official_initialisation_statistics():
    model = DiT(ModelConfig(), rngs=nnx.Rngs(0))
    table = np.asarray(model.y_embedder.embedding_table.embedding[...])
    assert table.shape == (101, 384) and abs(table.std() - 0.02) < 0.001
    assert abs(float(model.t_embedder.mlp_in.kernel[...].std()) - 0.02) < 0.002
    qkv = np.asarray(model.blocks.attn.qkv.kernel[...])
    assert qkv.shape == (12, 384, 1152)  # stacked: one leading depth axis
    bound = np.sqrt(6 / (384 + 1152))  # xavier uniform, from each block's own (384, 1152) fan
    for block in qkv:
        assert block.max() <= bound and block.min() >= -bound and block.std() > 0.8 * bound / np.sqrt(3)
    assert not np.allclose(qkv[0], qkv[1])  # every block drew its own weights
    assert not np.any(np.asarray(model.blocks.adaln_modulation.kernel[...]))
    assert not np.any(np.asarray(model.final_layer.linear.kernel[...]))
    assert not np.any(np.asarray(model.blocks.attn.qkv.bias[...]))


def test_guided_model_fn_with_scale_one_is_conditional_and_interval_switches_it_off():
    from dit.guidance import guided_model_fn
    model = randomized(TINY)
    x, t, y = batch(TINY, n=3)
    fn = lambda x, t, y: model(x, t, y)
    np.testing.assert_array_equal(guided_model_fn(fn, 1.0, TINY.num_classes)(x, t, y), model(x, t, y))
    cond, uncond = model(x, t, y), model(x, t, jnp.full_like(y, TINY.num_classes))
    out = guided_model_fn(fn, 3.0, TINY.num_classes, guided_channels=4)(x, t, y)
    np.testing.assert_allclose(out[..., :4], uncond[..., :4] + 3.0 * (cond[..., :4] - uncond[..., :4]), atol=1e-4)
    np.testing.assert_allclose(out[..., 4:], cond[..., 4:], atol=1e-5)
    t_hi = jnp.array([900, 100, 500])
    out = guided_model_fn(fn, 3.0, TINY.num_classes, interval=(0, 600))(x, t_hi, y)
    np.testing.assert_allclose(out[0], model(x, t_hi, y)[0], atol=1e-5)  # outside the interval: conditional
    assert not np.allclose(out[1], model(x, t_hi, y)[1], atol=1e-3)


def test_scanned_blocks_equal_the_unrolled_loop():
    scanned = randomized(dataclasses.replace(TINY, depth=3, scan_blocks=True))
    looped = DiT(dataclasses.replace(TINY, depth=3, scan_blocks=False), rngs=nnx.Rngs(1))
    nnx.update(looped, nnx.state(scanned))
    x, t, y = batch(TINY)
    np.testing.assert_allclose(scanned(x, t, y), looped(x, t, y), rtol=1e-5, atol=1e-5)


def test_auto_scans_the_blocks_on_the_cpu_and_writes_them_out_for_accelerators():
    model = DiT(dataclasses.replace(TINY, depth=3, scan_blocks="auto"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    traced = jax.jit(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y)).trace(params, *batch(TINY))
    # Lowered, not compiled: a TPU and a GPU program can be written on this CPU host.
    programs = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
    assert "stablehlo.while" in programs["cpu"]
    assert "stablehlo.while" not in programs["tpu"] and "stablehlo.while" not in programs["cuda"]
    assert model.cfg.blocks_scanned_on("cpu") and not model.cfg.blocks_scanned_on("tpu")


def test_every_block_parameter_is_stacked_over_depth():
    cfg = dataclasses.replace(TINY, depth=3, adaln="shared", qk_norm=True)
    for _, leaf in nnx.to_flat_state(nnx.state(DiT(cfg, rngs=nnx.Rngs(0)).blocks, nnx.Param)):
        assert leaf.shape[0] == 3


def test_stacked_blocks_hold_each_block_as_it_was_made():
    from dit.model import DiTBlock, stack_blocks
    rngs = nnx.Rngs(0)
    blocks = [DiTBlock(TINY, rngs) for _ in range(3)]
    stacked = stack_blocks(blocks)
    for i, block in enumerate(blocks):
        for (path, leaf), (_, stacked_leaf) in zip(nnx.to_flat_state(nnx.state(block)),
                                                   nnx.to_flat_state(nnx.state(stacked))):
            np.testing.assert_array_equal(stacked_leaf[...][i], leaf[...], err_msg=str(path))


def test_scanned_blocks_recompute_only_the_attention_logits():
    # The scanned blocks' policy (SCANNED_RESIDUALS) keeps every weight product's output and attention's output,
    # so their backward recomputes one product, the logits q.k for the softmax. Counted in the compiled CPU
    # gradient: three scanned blocks have exactly one product more than one written-out block without remat
    # (which keeps everything). A policy keeping only attention's names gives 5 more, and one that does not
    # keep attention's output gives 1 more (both checked, 2026-12-08).
    x, t, y = batch(TINY)

    def products(depth: int, scan: bool) -> int:
        graphdef, params = nnx.split(DiT(dataclasses.replace(TINY, depth=depth, scan_blocks=scan), rngs=nnx.Rngs(0)))
        loss = lambda p: jnp.sum(jnp.square(nnx.merge(graphdef, p)(x, t, y)))
        return jax.jit(jax.grad(loss)).lower(params).compile().as_text().count(" dot(")

    assert products(3, scan=True) == products(1, scan=False) + 1


@pytest.mark.parametrize("remat, scan_blocks", [("none", True), ("block", True), ("dots", True), ("block", False),
                                                ("dots", False)])
def test_remat_gives_the_same_gradients_as_none(remat, scan_blocks):
    # Against the unrolled blocks without remat: no jax.checkpoint at all (the scanned `none` keeps a subset).
    base = randomized(dataclasses.replace(TINY, depth=3, pos_embed="rope", qk_norm=True, scan_blocks=False))
    other = DiT(dataclasses.replace(base.cfg, remat=remat, scan_blocks=scan_blocks), rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(base))
    x, t, y = batch(TINY)

    def gradients(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.sum(jnp.square(nnx.merge(graphdef, p)(x, t, y)))
        return jax.jit(jax.grad(loss))(params)

    expected, got = jax.tree.leaves(gradients(base)), jax.tree.leaves(gradients(other))
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        # Within float32 rounding of each array's scale: recomputing reorders the sums, and an element near
        # zero can differ by a few ulps of its array's largest (about 5e-7 of it, measured 2026-12-08).
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(a))))


@pytest.mark.parametrize("name", REGISTERED)
def test_residual_stream_stays_float32_in_low_precision(name, monkeypatch):
    seen = []

    def recorded(call):
        def wrapper(self, x, *args, **kwargs):
            out = call(self, x, *args, **kwargs)
            seen.append((call.__qualname__, x.dtype, out.dtype))
            return out
        return wrapper

    monkeypatch.setattr(DiTBlock, "__call__", recorded(DiTBlock.__call__))
    monkeypatch.setattr(FinalLayer, "__call__", recorded(FinalLayer.__call__))
    for dtype in ("bfloat16", "float16"):
        cfg = dataclasses.replace(smoke(RunConfig(model=resolve(name))).model, dtype=dtype)
        graphdef, state = nnx.split(DiT(cfg, rngs=nnx.Rngs(0)))
        jax.make_jaxpr(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y))(state, *batch(cfg, n=2))
    assert {call for call, _, _ in seen} == {"DiTBlock.__call__", "FinalLayer.__call__"}
    # Every block's input and output and the final layer's input: only the final projection is low precision.
    assert all(x == jnp.float32 for _, x, _ in seen)
    assert all(out == jnp.float32 for call, _, out in seen if call == "DiTBlock.__call__")


def test_bfloat16_blocks_round_the_residual_gradient_only():
    # The gradient a block passes back to the residual stream is rounded to bfloat16 with bfloat16 compute (either
    # attention), kept float32 with float16 (range) and float32; the stream itself stays float32 (round_gradient's
    # forward is the identity: tests/test_layers.py).
    x = jax.random.normal(jax.random.key(0), (2, TINY.num_tokens, TINY.hidden_size), jnp.float32)
    c = jax.random.normal(jax.random.key(1), (2, TINY.hidden_size), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    for dtype, attention, rounded in (("bfloat16", "dense", True), ("bfloat16", "blockwise", True),
                                      ("float16", "dense", False), ("float32", "dense", False)):
        cfg = dataclasses.replace(TINY, dtype=dtype, attention=attention)
        block_def, stacked = nnx.split(randomized(cfg).blocks)
        block = nnx.merge(block_def, jax.tree.map(lambda a: a[0], stacked))  # the first block, non-zero weights
        out, backward = jax.vjp(lambda x: block(x, c), x)
        (gradient,) = backward(cotangent)
        assert out.dtype == gradient.dtype == jnp.float32
        representable = np.array_equal(gradient, gradient.astype(jnp.bfloat16).astype(jnp.float32))
        assert representable == rounded, (dtype, attention)


@pytest.mark.parametrize("pos_embed", ["rope", "sincos_rope"])
def test_rope_low_precision_error_is_close_to_sincos(pos_embed):
    base = ModelConfig(input_size=16, patch_size=2, hidden_size=128, depth=4, num_heads=2, num_classes=10)
    weights = nnx.state(randomized(base))  # no position parameters: the same weights fit every pos_embed
    x, t, y = batch(base)

    def low_precision_error(pos_embed):
        outputs = []
        for dtype in ("float32", "bfloat16"):
            model = DiT(dataclasses.replace(base, pos_embed=pos_embed, dtype=dtype), rngs=nnx.Rngs(1))
            nnx.update(model, weights)
            outputs.append(model(x, t, y))
        return float(jnp.linalg.norm(outputs[1] - outputs[0]) / jnp.linalg.norm(outputs[0]))

    assert low_precision_error(pos_embed) <= 1.4 * low_precision_error("sincos")


def test_shared_adaln_is_initialised_as_pixart_alpha_adaln_single():
    for shift, chunks in ((True, 6), (False, 4)):
        model = DiT(dataclasses.replace(ModelConfig(), adaln="shared", adaln_shift=shift), rngs=nnx.Rngs(0))
        # PixArt-alpha: each block's scale_shift_table randn(6, d) / sqrt(d); t_block's linear N(0, 0.02), bias 0.
        tables = np.asarray(model.blocks.adaln_offset[...])
        assert tables.shape == (12, chunks * 384)
        assert abs(tables.std() - 1 / np.sqrt(384)) < 0.03 / np.sqrt(384) and abs(tables.mean()) < 0.002
        assert not np.allclose(tables[0], tables[1])  # every block drew its own table
        kernel = np.asarray(model.shared_adaln.kernel[...])
        assert kernel.shape == (384, chunks * 384) and abs(kernel.std() - 0.02) < 0.0005 and abs(kernel.mean()) < 0.0005
        assert not np.any(np.asarray(model.shared_adaln.bias[...]))


def test_wo_shift_equals_adaln_with_zero_shifts():
    shifted = randomized(TINY)
    d = TINY.hidden_size
    unshifted = DiT(dataclasses.replace(TINY, adaln_shift=False), rngs=nnx.Rngs(1))
    nnx.update(unshifted, nnx.state(shifted))  # everything but the blocks' modulation has the same shape
    kernel = np.array(shifted.blocks.adaln_modulation.kernel[...]).reshape(TINY.depth, d, 6, d)
    bias = np.array(shifted.blocks.adaln_modulation.bias[...]).reshape(TINY.depth, 6, d)
    kernel[:, :, [0, 3]], bias[:, [0, 3]] = 0, 0  # shift_msa and shift_mlp
    shifted.blocks.adaln_modulation.kernel.set_value(jnp.asarray(kernel.reshape(TINY.depth, d, 6 * d)))
    shifted.blocks.adaln_modulation.bias.set_value(jnp.asarray(bias.reshape(TINY.depth, 6 * d)))
    kept = [1, 2, 4, 5]  # scale and gate of attention, then of the MLP: LightningDiT's wo_shift order
    unshifted.blocks.adaln_modulation.kernel.set_value(jnp.asarray(kernel[:, :, kept].reshape(TINY.depth, d, 4 * d)))
    unshifted.blocks.adaln_modulation.bias.set_value(jnp.asarray(bias[:, kept].reshape(TINY.depth, 4 * d)))
    x, t, y = batch(TINY)
    np.testing.assert_allclose(unshifted(x, t, y), shifted(x, t, y), rtol=1e-5, atol=1e-6)
