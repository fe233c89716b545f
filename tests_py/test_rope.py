"""kvpress_rs.rope against transformers' own rotary embeddings, and the rotation identities
a cache relies on (inverse, shift, re-rotation after eviction), for every rope type.

transformers computes angles in float32 (position · inv_freq, both float32), so its cos/sin
carry an error of up to a few float32 ulps of the angle (≈ 3e-5 at angle 2048). Comparisons
with transformers' cos/sin therefore allow 1e-6 plus that bound, 4·2^-24·|angle|; the
frequencies themselves are compared at 1e-6 relative, and our own identities at 1e-6.
"""

from __future__ import annotations

import doctest
import math
import types

import pytest
import torch
from transformers import CohereConfig, GPTJConfig, LlamaConfig, PhiConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.cohere.modeling_cohere import CohereRotaryEmbedding
from transformers.models.gptj import modeling_gptj
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding

import kvpress_rs
from kvpress_rs import ops
from kvpress_rs.rope import Rope, base_bounds, rope_parameters

HEAD_DIM = 16
F32_ANGLE_ULPS = 4 * 2.0**-24

# One registry of rope configurations; every generic test runs through all of them.
# name -> (rope-type parameters, rope_theta, max_position_embeddings, partial_rotary_factor)
CASES = {
    "default": ({}, 10000.0, 32, None),
    "default_partial": ({}, 10000.0, 32, 0.5),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 10000.0, 32, None),
    "dynamic": ({"rope_type": "dynamic", "factor": 3.0}, 10000.0, 32, None),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}, 10000.0, 32, None),
    "yarn_mscale": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 16,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        },
        500.0,
        128,
        None,
    ),
    "yarn_partial": ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}, 1000.0, 32, 0.5),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        10000.0,
        64,
        None,
    ),
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
            "long_factor": [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)],
            "original_max_position_embeddings": 16,
        },
        10000.0,
        64,
        None,
    ),
}
SEQ_DEPENDENT = {"dynamic", "longrope"}


def hf_config(case: str, spelling: str = "new"):
    """A tiny transformers config for `case`: the 5.x `rope_parameters` spelling ("new") or
    `rope_scaling` + `rope_theta` ("old"). Partial-rotary cases are Phi configs."""
    rope, theta, max_pos, partial = CASES[case]
    rope = dict(rope)
    kwargs = dict(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
    )
    cls = PhiConfig if partial else LlamaConfig
    if spelling == "new":
        params = {"rope_type": "default", **rope, "rope_theta": theta}
        if partial:
            params["partial_rotary_factor"] = partial
        return cls(**kwargs, rope_parameters=params)
    if partial:
        kwargs["partial_rotary_factor"] = partial
    return cls(**kwargs, rope_scaling=rope or None, rope_theta=theta)


def test_both_spellings_read_the_same():
    for case in CASES:
        new, old = rope_parameters(hf_config(case, "new")), rope_parameters(hf_config(case, "old"))
        assert new == old, case
        # A config object that only has the older attributes (transformers 4.x style).
        rope, theta, max_pos, partial = CASES[case]
        legacy = types.SimpleNamespace(
            num_hidden_layers=1,
            hidden_size=64,
            num_attention_heads=4,
            max_position_embeddings=max_pos,
            rope_theta=theta,
            rope_scaling=({"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_type"}})
            if rope
            else None,
            partial_rotary_factor=partial,
        )
        assert rope_parameters(legacy) == new, case


def hf_seq_lens(case):
    max_pos = CASES[case][2]
    return [None, max_pos, 2 * max_pos + 1] if case in SEQ_DEPENDENT else [None]


@pytest.mark.parametrize("spelling", ["new", "old"])
@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_scaling_match_transformers(case, spelling):
    config = hf_config(case, spelling)
    rope = Rope.from_config(config)
    rope_type = config.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(rope_type, PhiRotaryEmbedding.compute_default_rope_parameters)
    assert rope.rope_type == rope_type
    assert rope.rotary_dim == int(HEAD_DIM * (CASES[case][3] or 1.0))
    for seq_len in hf_seq_lens(case):
        hf_inv, hf_scaling = init(config, None, seq_len=seq_len) if seq_len else init(config, None)
        ours = rope.inv_freq(seq_len)
        assert ours.dtype == torch.float64 and ours.shape == hf_inv.shape
        torch.testing.assert_close(ours, hf_inv.double(), rtol=1e-6, atol=0)
        assert rope.attention_scaling == pytest.approx(hf_scaling, rel=1e-12)
    if case in SEQ_DEPENDENT:  # the length matters beyond the original context
        assert not torch.equal(rope.inv_freq(), rope.inv_freq(4 * CASES[case][2]))


def hf_tolerance(angles: torch.Tensor, scaling: float) -> torch.Tensor:
    """1e-6 plus the float32 rounding transformers' angles carry."""
    return 1e-6 + F32_ANGLE_ULPS * angles.abs() * scaling


def assert_close_to_hf(ours: torch.Tensor, hf: torch.Tensor, tol: torch.Tensor):
    err = (ours.double() - hf.double()).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}, max err {err.max().item():.3g}"


@pytest.mark.parametrize("spelling", ["new", "old"])
@pytest.mark.parametrize("case", list(CASES))
def test_cos_sin_match_transformers_rotary_embedding(case, spelling):
    config = hf_config(case, spelling)
    rope = Rope.from_config(config)
    max_pos = CASES[case][2]
    x = torch.zeros(1, dtype=torch.float32)
    # Within the context, then up to twice beyond it (one forward each, as transformers'
    # module updates dynamic/longrope frequencies from max(position_ids) + 1).
    for end in (max_pos, 2 * max_pos):
        hf = PhiRotaryEmbedding(config)
        positions = torch.arange(end)[None]
        hf_cos, hf_sin = hf(x, positions)
        seq_len = end if case in SEQ_DEPENDENT else None
        cos, sin = rope.cos_sin(positions, seq_len=seq_len)
        assert cos.dtype == torch.float32 and cos.shape == hf_cos.shape
        torch.testing.assert_close(rope.inv_freq(seq_len), hf.inv_freq.double(), rtol=1e-6, atol=0)
        angles = positions[0, :, None].double() * torch.cat([rope.inv_freq(seq_len)] * 2)
        tol = hf_tolerance(angles, rope.attention_scaling)
        assert_close_to_hf(cos[0], hf_cos[0], tol)
        assert_close_to_hf(sin[0], hf_sin[0], tol)


def test_cos_sin_far_beyond_the_context():
    """Positions up to 100K on a 4K-context config: still transformers' values (within its
    own float32 rounding)."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096, rope_theta=5e5)
    rope = Rope.from_config(config)
    positions = torch.cat([torch.arange(0, 8192, 7), torch.randint(8192, 100_000, (500,))])[None]
    hf_cos, hf_sin = PhiRotaryEmbedding(config)(torch.zeros(1), positions)
    cos, sin = rope.cos_sin(positions)
    angles = positions[0, :, None].double() * torch.cat([rope.inv_freq()] * 2)
    assert_close_to_hf(cos[0], hf_cos[0], hf_tolerance(angles, 1.0))
    assert_close_to_hf(sin[0], hf_sin[0], hf_tolerance(angles, 1.0))
    # ... and closer to the float64 truth than transformers' float32 angles are.
    truth = angles.cos()
    assert (cos[0].double() - truth).abs().max() < 1e-6 < (hf_cos[0].double() - truth).abs().max()


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 2.0}])
def test_interleaved_cos_sin_match_cohere(rope_scaling):
    config = CohereConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=32,
        rope_scaling=rope_scaling,
    )
    rope = Rope.from_config(config)
    assert rope.interleaved  # detected from the model type
    positions = torch.arange(64)[None]
    hf_cos, hf_sin = CohereRotaryEmbedding(config)(torch.zeros(1), positions)
    cos, sin = rope.cos_sin(positions)
    angles = positions[0, :, None].double() * rope.inv_freq().repeat_interleave(2)
    assert_close_to_hf(cos[0], hf_cos[0], hf_tolerance(angles, 1.0))
    assert_close_to_hf(sin[0], hf_sin[0], hf_tolerance(angles, 1.0))


def rotate_half_reference(x, cos, sin, rotary_dim):
    """transformers' apply_rotary_pos_emb on the rotary channels, the rest passed through."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated, _ = apply_rotary_pos_emb(rot, rot, cos, sin)
    return torch.cat([rotated, rest], dim=-1)


def interleaved_reference(x, cos, sin, rotary_dim):
    """GPT-J style, written here: pairs (2i, 2i+1) turn by the angle of frequency i."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    out = torch.stack([even * c - odd * s, odd * c + even * s], dim=-1).flatten(-2)
    return torch.cat([out, rest], dim=-1)


@pytest.mark.parametrize("case", list(CASES))
def test_apply_matches_transformers_apply_rotary_pos_emb(case):
    config = hf_config(case)
    rope = Rope.from_config(config)
    torch.manual_seed(0)
    position_ids = torch.stack([torch.arange(40), torch.arange(40) + 17])  # (batch, tokens)
    x = torch.randn(2, 3, 40, HEAD_DIM)
    seq_len = 57 if case in SEQ_DEPENDENT else None
    # With transformers' own cos/sin (its float32 angle rounding allowed for) ...
    hf_cos, hf_sin = PhiRotaryEmbedding(config)(x, position_ids)
    expected = rotate_half_reference(x, hf_cos, hf_sin, rope.rotary_dim)
    got = rope.apply(x, position_ids, seq_len=seq_len)
    max_angle = 57 * rope.inv_freq(seq_len).max().item() * rope.attention_scaling
    torch.testing.assert_close(got, expected, atol=1e-6 + 8 * F32_ANGLE_ULPS * max_angle, rtol=1e-6)
    # ... and at 1e-6 with transformers' rotation over our (f64-exact) cos/sin.
    cos, sin = rope.cos_sin(position_ids, seq_len=seq_len)
    torch.testing.assert_close(got, rotate_half_reference(x, cos, sin, rope.rotary_dim), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_interleaved_apply_matches_reference(case):
    params = rope_parameters(hf_config(case))
    rope = Rope(**{**params, "interleaved": True})
    torch.manual_seed(1)
    x = torch.randn(2, 3, 25, HEAD_DIM)
    positions = torch.randint(0, 200, (2, 3, 25))
    cos, sin = rope.cos_sin(positions)
    torch.testing.assert_close(
        rope.apply(x, positions), interleaved_reference(x, cos, sin, rope.rotary_dim), atol=1e-6, rtol=1e-6
    )


def test_gptj_partial_interleaved_matches_transformers():
    config = GPTJConfig(vocab_size=32, n_embd=64, n_head=4, n_layer=1, rotary_dim=8, n_positions=64)
    rope = Rope.from_config(config)
    assert (rope.interleaved, rope.rotary_dim, rope.head_dim) == (True, 8, 16)
    torch.manual_seed(2)
    x = torch.randn(1, 4, 64, 16)  # (batch, heads, tokens, head_dim)
    sincos = modeling_gptj.create_sinusoidal_positions(64, 8)  # (positions, rotary_dim): sin | cos
    sin, cos = sincos[None, :, :4], sincos[None, :, 4:]
    xt = x.transpose(1, 2)  # GPT-J rotates (batch, tokens, heads, head_dim)
    expected = torch.cat([modeling_gptj.apply_rotary_pos_emb(xt[..., :8], sin, cos), xt[..., 8:]], -1).transpose(1, 2)
    max_angle = 63.0
    torch.testing.assert_close(rope.apply(x, torch.arange(64)), expected, atol=1e-6 + 8 * F32_ANGLE_ULPS * max_angle, rtol=1e-6)


def all_ropes():
    """Every registry case in both layouts."""
    for case in CASES:
        params = rope_parameters(hf_config(case))
        for interleaved in (False, True):
            yield f"{case}-{'interleaved' if interleaved else 'half'}", Rope(**{**params, "interleaved": interleaved})


ROPES = dict(all_ropes())


@pytest.mark.parametrize("name", list(ROPES))
def test_invert_apply_shift_identities_fp32(name):
    rope = ROPES[name]
    torch.manual_seed(3)
    b, h, t = 2, 3, 33
    x = torch.randn(b, h, t, HEAD_DIM)
    p = torch.randint(0, 5000, (b, h, t))
    for seq_len in (None, 7000):
        y = rope.apply(x, p, seq_len=seq_len)
        assert y.dtype == x.dtype and y.shape == x.shape
        torch.testing.assert_close(rope.invert(y, p, seq_len=seq_len), x, atol=1e-6, rtol=1e-6)
        # Per-token deltas, one delta for all, deltas per token only; +d then -d.
        for d in (torch.randint(-3000, 3000, (b, h, t)), 1234, torch.randint(-50, 50, (t,))):
            moved = rope.shift(y, d, seq_len=seq_len)
            torch.testing.assert_close(moved, rope.apply(x, p + d, seq_len=seq_len), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(rope.shift(moved, -d, seq_len=seq_len), y, atol=1e-6, rtol=1e-6)
    # The pass-through channels are copied bit for bit.
    r = rope.rotary_dim
    assert torch.equal(rope.shift(y, 5)[..., r:], y[..., r:])


def test_scaling_is_applied_once():
    rope = ROPES["yarn_mscale-half"]
    s = rope.attention_scaling
    assert s != 1.0
    x = torch.randn(1, 1, 4, HEAD_DIM)
    y = rope.apply(x, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(y[..., : rope.rotary_dim], s * x[..., : rope.rotary_dim])
    # A shift is a pure rotation: norms are kept, the scaling is not applied again.
    torch.testing.assert_close(rope.shift(y, 100).norm(dim=-1), y.norm(dim=-1))


def rerotation_case(rope, dtype, seed=4):
    """Pre-RoPE keys, cached at positions 0..T-1; each head keeps its own sorted subset."""
    torch.manual_seed(seed)
    b, h, t, n = 2, 3, 120, 40
    pre = torch.randn(b, h, t, HEAD_DIM).to(dtype)
    kept = torch.stack([torch.randperm(t)[:n].sort().values for _ in range(b * h)]).reshape(b, h, n)
    return pre, kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ROPES))
def test_rerotation_equals_pruning_pre_rope_keys(name, dtype):
    """Keys cached at p_i, shifted by (i - p_i), equal RoPE applied at 0..n-1 to the pruned
    pre-RoPE keys."""
    rope = ROPES[name]
    pre, kept = rerotation_case(rope, dtype)
    t = pre.shape[2]
    cached = rope.apply(pre, torch.arange(t))
    gathered = ops.gather(cached, kept)
    compact = torch.arange(kept.shape[-1])
    rerotated = rope.shift(gathered, compact - kept)
    expected = rope.apply(ops.gather(pre, kept), compact)
    if dtype == torch.float32:
        torch.testing.assert_close(rerotated, expected, atol=1e-6, rtol=1e-6)
    else:
        # Both sides are rounded to the dtype, and the cached keys once more before the
        # shift, so a channel may differ by up to two roundings (unit roundoff u) of its
        # rotation pair's norm: 1e-3 plus 2u·‖pair‖. The pass-through channels are exact.
        u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        err = (rerotated.float() - expected.float()).abs()
        assert bool((err <= 1e-3 + 2 * u * pair_norms(expected.float(), rope)).all()), err.max()
        assert torch.equal(rerotated[..., rope.rotary_dim :], expected[..., rope.rotary_dim :])


def pair_norms(y, rope):
    """Each rotary channel replaced by the norm of the pair it rotates with."""
    r, f = rope.rotary_dim, rope.rotary_dim // 2
    rot = y[..., :r]
    if rope.interleaved:
        n = rot.unflatten(-1, (f, 2)).norm(dim=-1).repeat_interleave(2, -1)
    else:
        n = torch.cat([torch.hypot(rot[..., :f], rot[..., f:])] * 2, -1)
    return torch.cat([n, y[..., r:].abs()], -1)


def exact_rotation(x64, positions, theta, dim):
    """Rotate-half RoPE in float64 from the textbook formula θ_f = theta^(-2f/dim)."""
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = positions.double()[..., None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x64[..., : dim // 2], x64[..., dim // 2 :]
    return x64 * cos + torch.cat([-x2, x1], -1) * sin


def naive_bf16_rotation(x, positions, theta, dim, angle_dtype):
    """What a plain bf16 pipeline does: angles in `angle_dtype`, cos/sin cast to bf16, the
    rotation in bf16 (transformers' float32 angles when angle_dtype is float32)."""
    inv = (1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).to(angle_dtype)
    ang = positions.to(angle_dtype)[..., None] * inv
    cos = torch.cat([ang.cos()] * 2, -1).to(torch.bfloat16)
    sin = torch.cat([ang.sin()] * 2, -1).to(torch.bfloat16)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_bf16_angles_do_not_inherit_bf16_error():
    """Keys of a chunk encoded at 0..T-1 (bf16), shifted to ~1e6: ours match the float64
    reference within bf16 rounding; a naive bf16 rotation does not."""
    theta, dim = 1e6, 64
    rope = Rope(dim, theta=theta)
    torch.manual_seed(5)
    pre = torch.randn(1, 4, 64, dim, dtype=torch.float64)
    local = torch.arange(64)
    delta = 1_000_003
    cached = rope.apply(pre.bfloat16(), local)
    shifted = rope.shift(cached, delta)
    exact = exact_rotation(pre, local + delta, theta, dim)
    ours = (shifted.double() - exact).abs()
    assert ours.mean() < 4e-3  # what rounding O(1) values to bf16 twice costs
    # Angles in bf16 (the naive rotation): positions near 1e6 lose all relative exactness.
    naive = (naive_bf16_rotation(pre.bfloat16(), local + delta, theta, dim, torch.bfloat16).double() - exact).abs()
    assert naive.mean() > 100 * ours.mean()
    # Angles in float32, cos/sin in bf16 (a bf16 transformers model): the fast channels are
    # off by up to |p·θ|·6e-8 rad, several times our worst error.
    hf_like = (naive_bf16_rotation(pre.bfloat16(), local + delta, theta, dim, torch.float32).double() - exact).abs()
    assert hf_like.max() > 3 * ours.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_libtorch_path_agrees_with_cpu_kernel(dtype):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 50, HEAD_DIM).to(dtype)
    p = torch.randint(0, 10**6, (2, 3, 50))
    ulp = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    for name in ("default_partial-half", "yarn_mscale-interleaved", "longrope-half", "llama3-interleaved"):
        rope = ROPES[name]
        rust = [rope.apply(x, p), rope.invert(x, p), rope.shift(x, p[0, 0]), rope.shift(x, -7), *rope.cos_sin(p)]
        with ops.cpu_kernels(False):
            libtorch = [rope.apply(x, p), rope.invert(x, p), rope.shift(x, p[0, 0]), rope.shift(x, -7), *rope.cos_sin(p)]
        for r, lt in zip(rust, libtorch):
            assert r.dtype == lt.dtype and r.shape == lt.shape
            torch.testing.assert_close(r.float(), lt.float(), atol=1e-6, rtol=ulp)


def test_strided_inputs_and_position_shapes():
    rope = ROPES["yarn-half"]
    torch.manual_seed(7)
    base = torch.randn(2, 30, 3, HEAD_DIM)  # (batch, tokens, heads, dim) as projections come
    x = base.transpose(1, 2)  # a non-contiguous (batch, heads, tokens, dim) view
    assert not x.is_contiguous()
    p = torch.arange(30) + 11
    expected = rope.apply(x.contiguous(), p)
    torch.testing.assert_close(rope.apply(x, p), expected, atol=0, rtol=0)
    # (T,), (B, T), (B, H, T), expanded, int32 and broadcast sizes all mean the same.
    for q in (p[None].expand(2, 30), p.expand(2, 3, 30), p.to(torch.int32), p[None, None], p.view(1, 1, 30)):
        torch.testing.assert_close(rope.apply(x, q), expected, atol=0, rtol=0)
    # A scalar position rotates every token alike.
    torch.testing.assert_close(rope.apply(x, torch.tensor(5)), rope.apply(x, torch.full((30,), 5)), atol=0, rtol=0)
    # Zero tokens: an empty result.
    assert rope.apply(x[:, :, :0], torch.arange(0)).shape == (2, 3, 0, HEAD_DIM)


def test_bad_input_raises_clear_errors():
    rope = Rope(HEAD_DIM)
    x = torch.randn(1, 2, 5, HEAD_DIM)
    with pytest.raises(kvpress_rs.ShapeError, match="rank 4"):
        rope.apply(x[0], torch.arange(5))
    with pytest.raises(kvpress_rs.ShapeError, match="positions"):
        rope.apply(x, torch.arange(6))
    with pytest.raises(kvpress_rs.ShapeError, match="positions"):
        rope.apply(x, torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(kvpress_rs.ShapeError, match="delta"):
        rope.shift(x, torch.zeros(2, 2, 2, 2, dtype=torch.long))
    with pytest.raises(kvpress_rs.DtypeError, match="integer"):
        rope.apply(x, torch.arange(5.0))
    with pytest.raises(kvpress_rs.DtypeError, match="integer"):
        rope.shift(x, torch.tensor(1.5))
    with pytest.raises(kvpress_rs.DtypeError, match="x"):
        rope.apply(x.double(), torch.arange(5))
    with pytest.raises(kvpress_rs.ShapeError, match="head_dim is 16"):
        rope.apply(torch.randn(1, 2, 5, 32), torch.arange(5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        rope.apply(x, [0, 1, 2, 3, 4])
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="positions"):
        rope.apply(x, torch.full((5,), 2**60))  # beyond float64 integer exactness
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="unknown rope type"):
        Rope(HEAD_DIM, rope_type="ntk-typo")
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="factor"):
        Rope(HEAD_DIM, rope_type="linear")
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="low_freq_factor"):
        Rope(HEAD_DIM, rope_type="llama3", factor=8.0, original_max_position_embeddings=8192)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="short_factor"):
        Rope(HEAD_DIM, rope_type="longrope", short_factor=[1.0], long_factor=[1.0] * 8, max_position_embeddings=64)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="head_dim"):
        Rope(15)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="rotary_dim"):
        Rope(10, partial_rotary_factor=0.5)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="rotary_dim"):
        Rope(16, rotary_dim=20)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="theta"):
        Rope(16, theta=-1.0)
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="seq_len"):
        rope.inv_freq(-1)
    # Through a config: a missing `factor` and an unknown type are the same clear errors.
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="factor"):
        Rope.from_config({"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {"rope_type": "linear"}})
    with pytest.raises(kvpress_rs.InvalidArgumentError, match="unknown rope type"):
        Rope.from_config({"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {"type": "weird"}})
    with pytest.raises(kvpress_rs.UnsupportedModelError, match="no rotary"):
        Rope.from_config({"hidden_size": 64, "num_attention_heads": 4})


# Published configurations: (head_dim, rope_theta, context length, layers).
PUBLISHED = {
    "Llama-2-7B": (128, 1e4, 4096, 32),
    "Llama-3-8B": (128, 5e5, 8192, 32),
    "Mistral-7B-v0.2": (128, 1e6, 32768, 32),
    "Qwen2-7B": (128, 1e6, 32768, 28),
    "SmolLM2-135M": (64, 1e5, 8192, 30),
}


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_published_bases_lie_in_their_feasible_region(model):
    head_dim, theta, context, depth = PUBLISHED[model]
    b = base_bounds(head_dim, context, depth, torch.float32, base=theta)
    assert b.feasible and b.contains(theta) and not b.empty
    assert 1.0 < b.aliasing < b.stability <= b.lower < theta < b.upper == b.precision
    # Phases in bfloat16 leave no feasible base at all (the seed paper's finding).
    bf = base_bounds(head_dim, context, depth, "bfloat16", base=theta)
    assert bf.empty and not bf.feasible and bf.precision < 400
    # Rope.base_bounds checks the rope's own theta.
    assert Rope(head_dim, theta=theta).base_bounds(context, depth).feasible


def test_base_bounds_behave():
    # Base 10 cannot serve a 128K context; the lower bounds grow with the context and the
    # stability bound with depth; the precision bound grows with the dtype's precision.
    assert base_bounds(128, 131072, 32, base=10.0).feasible is False
    assert base_bounds(128, 131072, 32).lower > 1e5
    b1, b32, b80 = (base_bounds(128, 4096, n) for n in (1, 32, 80))
    assert b1.stability < b32.stability < b80.stability and b1.aliasing == b80.aliasing
    assert b1.max_phase == pytest.approx(math.pi) and b80.max_phase < b32.max_phase
    assert base_bounds(128, 4096, 1).stability == pytest.approx(b1.aliasing * 2 ** (128 / 126))
    assert base_bounds(128, 8192, 32).lower > b32.lower
    precisions = [base_bounds(128, 4096, 32, dt).precision for dt in ("bfloat16", "float16", "float32", "float64")]
    assert precisions == sorted(precisions)
    # Values stated in the docstring: aliasing (L/2π)^(d/(d-2)), precision 2^(24 d/(d-2)).
    assert b32.aliasing == pytest.approx((4096 / (2 * math.pi)) ** (128 / 126))
    assert b32.precision == pytest.approx(2 ** (24 * 128 / 126))
    for bad in (dict(head_dim=2), dict(head_dim=15), dict(context_length=0), dict(depth=0), dict(dtype="int8")):
        with pytest.raises(kvpress_rs.InvalidArgumentError):
            base_bounds(**{**dict(head_dim=128, context_length=4096, depth=32), **bad})


def test_rope_is_exported_and_documented():
    assert kvpress_rs.Rope is Rope and kvpress_rs.rope.base_bounds is base_bounds
    failures, tried = doctest.testmod(kvpress_rs.rope, optionflags=doctest.ELLIPSIS)
    assert tried >= 5 and failures == 0


def test_one_rope_serves_many_threads():
    """A Rope is immutable: concurrent calls (the GIL is released) give the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    rope = ROPES["llama3-half"]
    torch.manual_seed(8)
    xs = [torch.randn(1, 2, 300, HEAD_DIM).bfloat16() for _ in range(8)]
    deltas = [torch.randint(-10**5, 10**5, (1, 2, 300)) for _ in range(8)]
    serial = [rope.shift(x, d) for x, d in zip(xs, deltas)]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda xd: rope.shift(*xd), zip(xs, deltas)))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))
