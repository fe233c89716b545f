//! Quantization: round-trip error bounds against a plain reference, outliers, Hadamard,
//! the quantized store (sinks, append-only blocks, residual window, nbytes, crop, batch
//! reordering) and attention over it against a reference over the dequantized tensors.

mod common;

use common::*;
use kvpress_rs::quant::{Grouping, QuantConfig, QuantizedStore, QuantizedTensor, TensorLayout};
use tch::{Kind, Tensor};

fn config(bits: u32, g: usize, residual: usize) -> QuantConfig {
    QuantConfig::new(bits, g, residual).unwrap()
}

fn layout(bits: u32, g: usize, grouping: Grouping, d: usize) -> TensorLayout {
    TensorLayout::new(&config(bits, g, 0), grouping, d)
}

/// Flat indices of every quantization group of a (b, h, t, d) row-major array.
fn groups(shape: [usize; 4], g: usize, grouping: Grouping) -> Vec<Vec<usize>> {
    let [b, h, t, d] = shape;
    let at = |bi: usize, hi: usize, ti: usize, c: usize| ((bi * h + hi) * t + ti) * d + c;
    let mut out = Vec::new();
    for bi in 0..b {
        for hi in 0..h {
            match grouping {
                Grouping::Channel => {
                    for t0 in (0..t).step_by(g) {
                        for c in 0..d {
                            out.push((t0..t0 + g).map(|ti| at(bi, hi, ti, c)).collect());
                        }
                    }
                }
                Grouping::Token => {
                    for ti in 0..t {
                        for c0 in (0..d).step_by(g) {
                            out.push((c0..c0 + g).map(|c| at(bi, hi, ti, c)).collect());
                        }
                    }
                }
            }
        }
    }
    out
}

/// Relative rounding of a dtype (what storing a dequantized value in it may add).
fn dtype_eps(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => 2f64.powi(-8),
        Kind::Half => 2f64.powi(-11),
        _ => 1e-6,
    }
}

/// Keys-like data: normal values, a few channels scaled up (outlier channels).
fn keys_like(shape: [i64; 4], seed: u64, kind: Kind) -> Tensor {
    let d = shape[3];
    let mut scale = vec![1.0f64; d as usize];
    scale[1] = 8.0;
    scale[(d / 2) as usize] = -5.0;
    randn(&shape, seed, Kind::Double)
        .g_mul(&Tensor::from_slice(&scale))
        .to_kind(kind)
}

#[test]
fn round_trip_error_is_within_half_a_reference_step() {
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        for bits in [2u32, 3, 4, 8] {
            for g in [32usize, 64, 128] {
                for grouping in [Grouping::Channel, Grouping::Token] {
                    let shape = [2usize, 3, 2 * g, 128];
                    let x = keys_like([2, 3, 2 * g as i64, 128], bits as u64 + g as u64, kind);
                    let q =
                        QuantizedTensor::quantize(&x, layout(bits, g, grouping, 128), "x").unwrap();
                    let back = q.dequantize().unwrap();
                    assert_eq!(back.size(), x.size());
                    assert_eq!(back.kind(), kind);
                    let (xs, ys) = (values_f64(&x), values_f64(&back));
                    let levels = ((1u32 << bits) - 1) as f64;
                    let mut worst = 0.0f64;
                    for idx in groups(shape, g, grouping) {
                        let vals: Vec<f64> = idx.iter().map(|&i| xs[i]).collect();
                        let mn = vals.iter().cloned().fold(f64::INFINITY, f64::min);
                        let mx = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let step = (mx - mn) / levels;
                        // float16 rounding of zero (down, ≤ 2^-10 |min|) and scale (up).
                        let slack = mn.abs() * 2f64.powi(-10) / levels + step * 2f64.powi(-9);
                        for &i in &idx {
                            let err = (xs[i] - ys[i]).abs();
                            let bound = 0.5 * step
                                + slack
                                + dtype_eps(kind) * xs[i].abs().max(ys[i].abs())
                                + 1e-6;
                            assert!(
                                err <= bound,
                                "{kind:?} bits {bits} g {g} {grouping:?}: |{} - {}| = {err} > {bound}",
                                xs[i],
                                ys[i]
                            );
                            worst = worst.max(err / step.max(1e-12));
                        }
                    }
                    // Half a step is also reached (the bound is not vacuous).
                    assert!(
                        worst > 0.3,
                        "{kind:?} {bits} {g} {grouping:?}: worst {worst}"
                    );
                }
            }
        }
    }
}

#[test]
fn codes_match_a_reference_quantizer() {
    // The float16 scale/zero are the reference's up to their rounding: the dequantized
    // values match the reference's to a small fraction of a step, and almost no value gets
    // a different code.
    let x = randn(&[1, 2, 64, 64], 5, Kind::Half).to_kind(Kind::Float);
    let q = QuantizedTensor::quantize(&x, layout(4, 32, Grouping::Token, 64), "x").unwrap();
    let (xs, ys) = (values_f64(&x), values_f64(&q.dequantize().unwrap()));
    let mut differ = 0;
    for idx in groups([1, 2, 64, 64], 32, Grouping::Token) {
        let vals: Vec<f64> = idx.iter().map(|&i| xs[i]).collect();
        let mn = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let mx = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s = (mx - mn) / 15.0;
        for &i in &idx {
            let reference = ((xs[i] - mn) / s).round().clamp(0.0, 15.0) * s + mn;
            let diff = (reference - ys[i]).abs();
            if diff > 0.5 * s {
                differ += 1;
            } else {
                assert!(diff < 0.02 * s, "{} vs {}: step {s}", ys[i], reference);
            }
        }
    }
    assert!(
        differ * 100 < xs.len(),
        "{differ} of {} values have another code",
        xs.len()
    );
}

#[test]
fn odd_shapes_batch_and_gqa_sized_heads() {
    for (b, h, d) in [(1, 1, 32), (3, 5, 64), (2, 3, 96), (1, 2, 256)] {
        let x = randn(&[b, h, 64, d], 7, Kind::BFloat16);
        for grouping in [Grouping::Channel, Grouping::Token] {
            let q =
                QuantizedTensor::quantize(&x, layout(4, 32, grouping, d as usize), "x").unwrap();
            assert_eq!(q.groups(), 64 * d as usize / 32);
            let back = q.dequantize().unwrap();
            let err = (back.to_kind(Kind::Float) - x.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[]);
            assert!(err < 0.6, "{b} {h} {d} {grouping:?}: {err}");
        }
    }
}

/// Views that are not one contiguous block quantize to the same codes as their contiguous
/// copy: a head range of a larger tensor (tiles found from the strides at an offset),
/// token-major memory (rows apart), and a channel slice (elements of a row not adjacent
/// to the next row's).
#[test]
fn strided_views_quantize_like_their_contiguous_copies() {
    let big = randn(&[2, 6, 96, 128], 11, Kind::BFloat16);
    let heads = big.narrow(1, 2, 3);
    let token_major = big.transpose(1, 2).contiguous().transpose(1, 2);
    let channels = big.narrow(3, 32, 64);
    for (x, d) in [(heads, 128), (token_major, 128), (channels, 64)] {
        for grouping in [Grouping::Channel, Grouping::Token] {
            let l = layout(4, 32, grouping, d);
            let q = QuantizedTensor::quantize(&x, l, "x").unwrap();
            let c = QuantizedTensor::quantize(&x.contiguous(), l, "x").unwrap();
            assert!(q.codes().equal(c.codes()), "{:?} {grouping:?}", x.stride());
            assert!(
                q.params().equal(c.params()),
                "{:?} {grouping:?}",
                x.stride()
            );
        }
    }
}

#[test]
fn outliers_are_kept_exactly_and_shrink_the_range() {
    let x = randn(&[2, 2, 64, 64], 9, Kind::Float);
    // Plant large values.
    let _ = x.get(0).get(0).get(3).get(5).fill_(40.0);
    let _ = x.get(1).get(1).get(60).get(0).fill_(-55.0);
    let mut c = config(2, 32, 0);
    c.outlier_fraction = 0.05; // ceil(1.6) = 2 per group
    assert_eq!(c.outliers_per_group(), 2);
    for grouping in [Grouping::Channel, Grouping::Token] {
        let with = QuantizedTensor::quantize(&x, TensorLayout::new(&c, grouping, 64), "x").unwrap();
        let without = QuantizedTensor::quantize(&x, layout(2, 32, grouping, 64), "x").unwrap();
        let xs = values_f64(&x);
        let ys = values_f64(&with.dequantize().unwrap());
        let zs = values_f64(&without.dequantize().unwrap());
        for i in [(3 * 64) + 5, ((3 * 64 + 60) * 64)] {
            assert_eq!(ys[i], xs[i], "{grouping:?}: outlier not exact");
        }
        let err = |v: &[f64]| v.iter().zip(&xs).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        assert!(
            err(&ys) < 0.8 * err(&zs),
            "{grouping:?}: outliers did not help"
        );
        let n_groups = with.groups() * 4;
        assert_eq!(
            with.nbytes(),
            without.nbytes() + n_groups * 2 * (1 + 4),
            "outliers cost a u8 position and an f32 value each"
        );
    }
}

#[test]
fn hadamard_round_trip_and_identity_on_attention_scores() {
    let x = keys_like([1, 2, 64, 64], 11, Kind::Float);
    let mut c = config(8, 32, 0);
    c.hadamard = true;
    let q = QuantizedTensor::quantize(&x, TensorLayout::new(&c, Grouping::Token, 64), "x").unwrap();
    let err = (q.dequantize().unwrap() - &x).abs().max().double_value(&[]);
    assert!(err < 0.05, "8-bit rotated round trip error {err}");
    // The rotation spreads outlier channels: per-token 2-bit groups do much better rotated.
    let plain = QuantizedTensor::quantize(&x, layout(2, 32, Grouping::Token, 64), "x").unwrap();
    let mut c2 = config(2, 32, 0);
    c2.hadamard = true;
    let rotated =
        QuantizedTensor::quantize(&x, TensorLayout::new(&c2, Grouping::Token, 64), "x").unwrap();
    let mse = |t: &Tensor| (t - &x).square().mean(Kind::Float).double_value(&[]);
    assert!(mse(&rotated.dequantize().unwrap()) < 0.7 * mse(&plain.dequantize().unwrap()));
}

#[test]
fn quantize_errors() {
    let l = layout(4, 32, Grouping::Token, 64);
    expect_err(
        QuantizedTensor::quantize(&randn(&[1, 1, 33, 64], 1, Kind::Float), l, "x"),
        "Shape",
    );
    expect_err(
        QuantizedTensor::quantize(&randn(&[1, 1, 32, 32], 1, Kind::Float), l, "x"),
        "Shape",
    );
    let nan = randn(&[1, 1, 32, 64], 1, Kind::Float);
    let _ = nan.get(0).get(0).get(7).get(3).fill_(f64::NAN);
    expect_err(QuantizedTensor::quantize(&nan, l, "x"), "NonFinite");
    let inf = randn(&[1, 1, 32, 64], 1, Kind::BFloat16);
    let _ = inf.get(0).get(0).get(2).get(1).fill_(f64::INFINITY);
    expect_err(QuantizedTensor::quantize(&inf, l, "x"), "NonFinite");
    let big = randn(&[1, 1, 32, 64], 1, Kind::Float) * 1e5;
    expect_err(QuantizedTensor::quantize(&big, l, "x"), "InvalidArgument");
}

/// The CPU kernel checks finiteness tile by tile (no separate pass): one NaN or ±inf
/// anywhere — the last tile of the last head of the second batch row, the last channel,
/// with outliers or a Hadamard rotation that would spread it — still raises, for every
/// dtype and grouping, and a large parallel input too.
#[test]
fn layouts_that_do_not_fit_the_head_dim_are_refused() {
    let x = randn(&[1, 1, 64, 96], 1, Kind::Float);
    expect_err(
        QuantizedTensor::quantize(&x, layout(4, 64, Grouping::Token, 96), "x"),
        "InvalidArgument",
    );
    let mut c = config(4, 32, 0);
    c.hadamard = true;
    let l = TensorLayout::new(&c, Grouping::Channel, 96);
    expect_err(QuantizedTensor::quantize(&x, l, "x"), "InvalidArgument");
    // The same tensor with layouts that fit it.
    assert!(QuantizedTensor::quantize(&x, layout(4, 32, Grouping::Token, 96), "x").is_ok());
    assert!(QuantizedTensor::quantize(&x, layout(4, 64, Grouping::Channel, 96), "x").is_ok());
}

#[test]
fn one_non_finite_value_anywhere_raises() {
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        for grouping in [Grouping::Channel, Grouping::Token] {
            for (outliers, hadamard) in [(0.0, false), (1.0 / 16.0, false), (0.0, true)] {
                let mut c = config(2, 32, 0);
                c.outlier_fraction = outliers;
                c.hadamard = hadamard;
                let l = TensorLayout::new(&c, grouping, 64);
                // A group's first and later 16-lane vectors both (the AVX-512 ranges
                // check them differently).
                for (t, ch, value) in [
                    (95, 63, f64::NAN),
                    (80, 5, f64::NAN),
                    (81, 40, f64::NAN),
                    (64, 0, f64::INFINITY),
                    (70, 17, f64::NEG_INFINITY),
                    (71, 33, f64::NEG_INFINITY),
                ] {
                    let x = randn(&[2, 3, 96, 64], 2, kind);
                    let _ = x.get(1).get(2).get(t).get(ch).fill_(value);
                    expect_err(QuantizedTensor::quantize(&x, l, "x"), "NonFinite");
                }
            }
        }
        // Token groups of 64 and 128 (4 and 8 vectors a group), NaN in each vector.
        for g in [64, 128] {
            let l = layout(3, g, Grouping::Token, 128);
            for ch in (0..128).step_by(16) {
                let x = randn(&[1, 2, g as i64, 128], 4, kind);
                let _ = x.get(0).get(1).get(7).get(ch + 3).fill_(f64::NAN);
                expect_err(QuantizedTensor::quantize(&x, l, "x"), "NonFinite");
            }
        }
        // Channel groups of 16-bit rows are read in blocks of 128, 64 and 32 channels,
        // even and odd bfloat16 channels in separate vectors: a NaN or an infinity in each.
        let l = layout(4, 32, Grouping::Channel, 224);
        for (t, ch) in [
            (0, 0),
            (31, 33),
            (5, 126),
            (6, 131),
            (7, 190),
            (8, 192),
            (9, 223),
        ] {
            for value in [f64::NAN, f64::INFINITY] {
                let x = randn(&[1, 2, 64, 224], 5, kind);
                let _ = x.get(0).get(1).get(32 + t).get(ch).fill_(value);
                expect_err(QuantizedTensor::quantize(&x, l, "x"), "NonFinite");
            }
        }
        // Above the size at which the kernel goes parallel.
        let x = randn(&[1, 4, 1024, 128], 3, kind);
        let _ = x.get(0).get(3).get(1000).get(127).fill_(f64::NAN);
        let l = layout(4, 32, Grouping::Token, 128);
        expect_err(QuantizedTensor::quantize(&x, l, "x"), "NonFinite");
    }
}

#[test]
fn config_validation() {
    for bits in [0u32, 1, 5, 16] {
        expect_err(QuantConfig::new(bits, 32, 128), "InvalidArgument");
    }
    for g in [0usize, 16, 48, 256] {
        expect_err(QuantConfig::new(4, g, 128), "InvalidArgument");
    }
    expect_err(QuantConfig::new(4, 32, 100), "InvalidArgument");
    let mut c = config(4, 32, 128);
    for f in [-0.1, 0.3, f64::NAN] {
        c.outlier_fraction = f;
        expect_err(c.validated(), "InvalidArgument");
    }
    // a block is whole groups, at most the window
    for (residual, block) in [(128, 0), (128, 48), (128, 160), (0, 64)] {
        let c = QuantConfig {
            block_length: Some(block),
            ..config(4, 32, residual)
        };
        expect_err(c.validated(), "InvalidArgument");
    }
    let c = QuantConfig {
        block_length: Some(96),
        ..config(4, 32, 128)
    };
    assert_eq!(
        (c.validated().unwrap().window_tokens(), c.block_tokens()),
        (128, 96)
    );
    // with a block, the window need not be whole groups
    let c = QuantConfig {
        residual_length: 100,
        block_length: Some(64),
        ..config(4, 32, 0)
    };
    assert_eq!(
        (c.validated().unwrap().window_tokens(), c.block_tokens()),
        (100, 64)
    );
    let c = QuantConfig {
        block_length: Some(128),
        ..c
    };
    expect_err(c.validated(), "InvalidArgument");
    let c = config(4, 64, 0);
    assert_eq!((c.window_tokens(), c.block_tokens()), (64, 64));
    expect_err(
        c.check_head_dim(96, Grouping::Token, "keys"),
        "InvalidArgument",
    );
    c.check_head_dim(96, Grouping::Channel, "keys").unwrap();
    let mut h = c;
    h.hadamard = true;
    expect_err(
        h.check_head_dim(96, Grouping::Channel, "keys"),
        "InvalidArgument",
    );
    // pre-RoPE keys need the model's RoPE (with or without Hadamard), and refuse
    // length-dependent ropes
    let mut p = c;
    p.pre_rope_keys = true;
    expect_err(QuantizedStore::new(p), "InvalidArgument");
    let rope = kvpress_rs::rope::Rope::new(kvpress_rs::rope::RopeSpec::new(64, 10_000.0)).unwrap();
    QuantizedStore::with_rope(p, Some(&rope)).unwrap();
    let mut ph = p;
    ph.hadamard = true;
    QuantizedStore::with_rope(ph, Some(&rope)).unwrap();
    let mut spec = kvpress_rs::rope::RopeSpec::new(64, 10_000.0);
    spec.rope_type = "dynamic".into();
    spec.params.factor = Some(2.0);
    spec.params.max_position_embeddings = Some(128);
    let dynamic = kvpress_rs::rope::Rope::new(spec).unwrap();
    expect_err(QuantizedStore::with_rope(p, Some(&dynamic)), "Unsupported");
}

// ---------------------------------------------------------------------------------------
// The store.

fn kv(shape: [i64; 4], seed: u64, kind: Kind) -> (Tensor, Tensor) {
    (
        keys_like(shape, seed, kind),
        randn(&shape, seed + 500, kind),
    )
}

fn store_config(bits: u32, g: usize, residual: usize, sinks: usize) -> QuantConfig {
    let mut c = config(bits, g, residual);
    c.sink_tokens = sinks;
    c
}

/// (sinks, quantized, residual) token counts.
fn parts(s: &QuantizedStore) -> (usize, usize, usize) {
    (s.sink_len(), s.quantized_len(), s.residual_len())
}

#[test]
fn tokens_flow_through_sinks_blocks_and_the_residual_window() {
    let mut store = QuantizedStore::new(store_config(4, 32, 128, 4)).unwrap();
    let (k, v) = kv([2, 3, 300, 64], 1, Kind::Float);
    store.append(&k, &v).unwrap();
    assert_eq!(parts(&store), (4, 256, 40));
    assert_eq!(store.blocks().len(), 1);
    let first_codes = store.blocks()[0].keys.codes().copy();
    let mut all_k = vec![k];
    let mut all_v = vec![v];
    for step in 0..100 {
        let (k, v) = kv([2, 3, 1, 64], 10 + step, Kind::Float);
        store.append(&k, &v).unwrap();
        all_k.push(k);
        all_v.push(v);
        let seen = 301 + step as usize;
        let residual = (seen - 4) % 128;
        assert_eq!(
            parts(&store),
            (4, seen - 4 - residual, residual),
            "step {step}"
        );
        assert_eq!(store.seen(), seen);
    }
    assert_eq!(store.blocks().len(), 2);
    // Append-only: the first block's codes never changed.
    assert!(store.blocks()[0].keys.codes().equal(&first_codes));
    // Dequantized: sinks and residual exact, blocks as quantized alone.
    let (dk, dv) = store.dequantize().unwrap();
    let k_all = Tensor::cat(&all_k, 2);
    let v_all = Tensor::cat(&all_v, 2);
    assert!(dk.narrow(2, 0, 4).equal(&k_all.narrow(2, 0, 4)));
    assert!(dk.narrow(2, 388, 12).equal(&k_all.narrow(2, 388, 12)));
    assert!(dv.narrow(2, 388, 12).equal(&v_all.narrow(2, 388, 12)));
    let l = store.layouts().unwrap();
    let block2 = QuantizedTensor::quantize(&k_all.narrow(2, 260, 128), l.0, "k").unwrap();
    assert!(dk.narrow(2, 260, 128).equal(&block2.dequantize().unwrap()));
}

#[test]
fn a_prompt_is_quantized_in_one_block_of_whole_windows() {
    let mut store = QuantizedStore::new(store_config(2, 64, 128, 0)).unwrap();
    let (k, v) = kv([1, 2, 1000, 64], 3, Kind::BFloat16);
    store.append(&k, &v).unwrap();
    assert_eq!(parts(&store), (0, 896, 104));
    assert_eq!(store.blocks().len(), 1);
    // A chunk that straddles the window: the window's tokens and the new ones leave
    // together, in one more block of whole windows.
    let (k2, v2) = kv([1, 2, 300, 64], 4, Kind::BFloat16);
    store.append(&k2, &v2).unwrap();
    assert_eq!(parts(&store), (0, 896 + 128 + 256, 20));
    assert_eq!(store.blocks().len(), 2);
    let (dk, _) = store.dequantize().unwrap();
    let k_all = Tensor::cat(&[&k, &k2], 2);
    let l = store.layouts().unwrap();
    let second = QuantizedTensor::quantize(&k_all.narrow(2, 896, 384), l.0, "k").unwrap();
    assert!(dk.narrow(2, 896, 384).equal(&second.dequantize().unwrap()));
    assert!(dk.narrow(2, 1280, 20).equal(&k_all.narrow(2, 1280, 20)));
}

#[test]
fn a_sliding_window_quantizes_its_oldest_block_and_keeps_the_rest() {
    // A 96-token window leaving in blocks of 32: after every append it holds
    // 64..=95 tokens once it has filled, whatever the append sizes.
    let c = QuantConfig {
        block_length: Some(32),
        ..store_config(2, 32, 96, 3)
    };
    let mut store = QuantizedStore::new(c).unwrap();
    let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
    let (mut seen, mut expected_residual) = (0usize, 0usize);
    for (i, n) in [50i64, 1, 1, 45, 1, 200, 7, 1, 1, 31, 1, 64]
        .into_iter()
        .enumerate()
    {
        let (k, v) = kv([2, 2, n, 64], 40 + i as u64, Kind::Float);
        store.append(&k, &v).unwrap();
        all_k.push(k);
        all_v.push(v);
        // the rule, token by token: a window of 96 gives up its oldest 32
        for t in 0..n as usize {
            if seen + t >= 3 {
                expected_residual += 1;
                if expected_residual == 96 {
                    expected_residual -= 32;
                }
            }
        }
        seen += n as usize;
        let sinks = seen.min(3);
        assert_eq!(
            parts(&store),
            (sinks, seen - sinks - expected_residual, expected_residual),
            "append {i} of {n}"
        );
    }
    assert!(expected_residual >= 64);
    // Every token where it belongs: sinks and window exact, the quantized tokens as one
    // quantization of the same tokens (blocks are whole groups, so block boundaries do
    // not change codes).
    let (dk, dv) = store.dequantize().unwrap();
    let (k_all, v_all) = (Tensor::cat(&all_k, 2), Tensor::cat(&all_v, 2));
    let quantized = store.quantized_len() as i64;
    let tail = 3 + quantized;
    assert!(dk.narrow(2, 0, 3).equal(&k_all.narrow(2, 0, 3)));
    assert!(dk.narrow(2, tail, seen as i64 - tail).equal(&k_all.narrow(
        2,
        tail,
        seen as i64 - tail
    )));
    assert!(dv.narrow(2, tail, seen as i64 - tail).equal(&v_all.narrow(
        2,
        tail,
        seen as i64 - tail
    )));
    let l = store.layouts().unwrap();
    let keys = QuantizedTensor::quantize(&k_all.narrow(2, 3, quantized), l.0, "k").unwrap();
    let values = QuantizedTensor::quantize(&v_all.narrow(2, 3, quantized), l.1, "v").unwrap();
    assert!(dk
        .narrow(2, 3, quantized)
        .equal(&keys.dequantize().unwrap()));
    assert!(dv
        .narrow(2, 3, quantized)
        .equal(&values.dequantize().unwrap()));
    // Against a whole-window flush, 64 tokens more are held in full precision instead of
    // quantized, and the bytes say exactly that (the window holds no spare capacity).
    let n = 3 + 96 * 4 + 1;
    let mut whole = QuantizedStore::new(store_config(2, 32, 96, 3)).unwrap();
    whole
        .append(&k_all.narrow(2, 0, n), &v_all.narrow(2, 0, n))
        .unwrap();
    let mut sliding = QuantizedStore::new(c).unwrap();
    sliding
        .append(&k_all.narrow(2, 0, n), &v_all.narrow(2, 0, n))
        .unwrap();
    assert_eq!(parts(&whole), (3, 96 * 4, 1));
    assert_eq!(parts(&sliding), (3, 96 * 4 - 64, 65));
    let quantized_token = 2 * (2 * 2 * 64 * (2 + 32 / 32) / 8); // keys and values, (bits + 32/G)/8 bytes
    let fp_token = 2 * (2 * 2 * 64 * 4); // keys and values, float32
    assert_eq!(
        sliding.nbytes() - whole.nbytes(),
        64 * (fp_token - quantized_token)
    );
    // crop can take back what the window still holds, and frees its bytes
    let before = sliding.nbytes();
    sliding.crop(60).unwrap();
    assert_eq!(parts(&sliding), (3, 96 * 4 - 64, 5));
    assert_eq!(before - sliding.nbytes(), 60 * fp_token);
    sliding.crop(5).unwrap();
    assert!(sliding.residual().is_none());
    assert_eq!(before - sliding.nbytes(), 65 * fp_token);
}

#[test]
fn residual_zero_quantizes_every_whole_group() {
    let mut store = QuantizedStore::new(store_config(4, 32, 0, 0)).unwrap();
    let (k, v) = kv([1, 1, 70, 32], 5, Kind::Float);
    store.append(&k, &v).unwrap();
    assert_eq!(parts(&store), (0, 64, 6));
    // Sinks that span several appends.
    let mut store = QuantizedStore::new(store_config(4, 32, 0, 5)).unwrap();
    for i in 0..3 {
        let (k, v) = kv([1, 1, 2, 32], 6 + i, Kind::Float);
        store.append(&k, &v).unwrap();
    }
    assert_eq!(parts(&store), (5, 0, 1));
}

#[test]
fn nbytes_is_exact_against_the_formula() {
    // (bits + 32/G)/16 of the float16 bytes for quantized tokens, plus the full-precision
    // tokens the residual window holds (no more is allocated) and sinks.
    for (bits, g) in [(2u32, 32usize), (3, 64), (4, 128), (8, 32)] {
        let (b, h, d, r, s) = (2usize, 3usize, 128usize, 128usize, 4usize);
        let mut store = QuantizedStore::new(store_config(bits, g, r, s)).unwrap();
        let (k, v) = kv([b as i64, h as i64, 1000, d as i64], 8, Kind::Half);
        store.append(&k, &v).unwrap();
        let quantized = store.quantized_len();
        assert_eq!(quantized, (1000 - s) / r * r);
        let fp16_bytes = |tokens: usize| 2 * b * h * tokens * d * 2; // keys + values
        let expected_quant = fp16_bytes(quantized) as f64 * (bits as f64 + 32.0 / g as f64) / 16.0;
        let expected = expected_quant as usize + fp16_bytes((1000 - s) % r) + fp16_bytes(s);
        assert_eq!(store.nbytes(), expected, "bits {bits} g {g}");
    }
}

#[test]
fn crop_removes_full_precision_tokens_only() {
    let mut store = QuantizedStore::new(store_config(4, 32, 64, 2)).unwrap();
    let (k, v) = kv([1, 2, 100, 32], 9, Kind::Float);
    store.append(&k, &v).unwrap();
    assert_eq!(parts(&store), (2, 64, 34));
    store.crop(10).unwrap();
    assert_eq!((parts(&store), store.seen()), ((2, 64, 24), 90));
    expect_err(store.crop(25), "State");
    expect_err(store.crop(1000), "InvalidArgument");
    assert_eq!(store.seen(), 90);
    let (dk, _) = store.dequantize().unwrap();
    assert!(dk.narrow(2, 66, 24).equal(&k.narrow(2, 66, 24)));
    // New tokens overwrite the cropped ones.
    let (k2, v2) = kv([1, 2, 3, 32], 10, Kind::Float);
    store.append(&k2, &v2).unwrap();
    let (dk, _) = store.dequantize().unwrap();
    assert!(dk.narrow(2, 90, 3).equal(&k2));
    // Before any block, sinks can be cropped too.
    let mut store = QuantizedStore::new(store_config(4, 32, 64, 8)).unwrap();
    let (k, v) = kv([1, 2, 10, 32], 11, Kind::Float);
    store.append(&k, &v).unwrap();
    store.crop(5).unwrap();
    assert_eq!(parts(&store), (5, 0, 0));
}

#[test]
fn batch_reordering_acts_on_every_part() {
    let mut store = QuantizedStore::new(store_config(3, 32, 32, 2)).unwrap();
    let (k, v) = kv([3, 2, 90, 32], 12, Kind::Float);
    store.append(&k, &v).unwrap();
    let (dk, dv) = store.dequantize().unwrap();
    let idx = tensor_i64(&[2, 0, 0], &[3]);
    store.index_batch(&idx).unwrap();
    let (rk, rv) = store.dequantize().unwrap();
    assert!(rk.equal(&dk.index_select(0, &idx)));
    assert!(rv.equal(&dv.index_select(0, &idx)));
    store.repeat_interleave_batch(2).unwrap();
    assert_eq!(store.shape().unwrap().batch, 6);
    let (rk2, _) = store.dequantize().unwrap();
    assert!(rk2.equal(&rk.repeat_interleave_self_int(2, 0, None)));
    // Appends continue with the new batch size.
    let (k2, v2) = kv([6, 2, 1, 32], 13, Kind::Float);
    store.append(&k2, &v2).unwrap();
    expect_err(
        store.index_batch(&tensor_i64(&[6], &[1])),
        "InvalidArgument",
    );
    expect_err(store.repeat_interleave_batch(0), "InvalidArgument");
    store.reset();
    assert_eq!((store.seen(), store.nbytes()), (0, 0));
    expect_err(store.dequantize(), "State");
}

#[test]
fn store_errors_leave_it_unchanged() {
    let mut store = QuantizedStore::new(store_config(4, 32, 32, 0)).unwrap();
    let (k, v) = kv([1, 2, 40, 64], 14, Kind::Float);
    store.append(&k, &v).unwrap();
    let before = (parts(&store), store.nbytes(), store.seen());
    let nan = randn(&[1, 2, 30, 64], 15, Kind::Float);
    let _ = nan.get(0).get(1).get(29).get(0).fill_(f64::NAN);
    expect_err(store.append(&nan, &nan), "NonFinite");
    let big = randn(&[1, 2, 30, 64], 15, Kind::Float) * 1e6;
    expect_err(store.append(&big, &big), "InvalidArgument");
    let f = |shape: [i64; 4], kind| randn(&shape, 16, kind);
    expect_err(
        store.append(
            &f([1, 3, 1, 64], Kind::Float),
            &f([1, 3, 1, 64], Kind::Float),
        ),
        "Shape",
    );
    expect_err(
        store.append(&f([1, 2, 1, 64], Kind::Half), &f([1, 2, 1, 64], Kind::Half)),
        "Dtype",
    );
    expect_err(
        store.append(
            &f([1, 2, 0, 64], Kind::Float),
            &f([1, 2, 0, 64], Kind::Float),
        ),
        "Empty",
    );
    assert_eq!((parts(&store), store.nbytes(), store.seen()), before);
    // Head dims checked at the first append.
    let mut s2 = QuantizedStore::new(store_config(4, 64, 64, 0)).unwrap();
    let (k, v) = kv([1, 1, 4, 32], 17, Kind::Float);
    expect_err(s2.append(&k, &v), "InvalidArgument");
    assert_eq!(s2.seen(), 0);
}

// ---------------------------------------------------------------------------------------
// Attention.

/// Reference attention in f64 over full keys/values (b, h, n, d): GQA, causal among the
/// last q queries (or an explicit mask (1|b, q, n)), scaling. Output (b, q, hq, dv).
fn reference_attention(
    query: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&Tensor>,
    scaling: f64,
) -> Vec<f64> {
    let (qd, kd, vd) = (dims(query), dims(keys), dims(values));
    let (b, hq, q, d) = (qd[0], qd[1], qd[2], qd[3]);
    let (h, n, dv) = (kd[1], kd[2], vd[3]);
    let rep = hq / h;
    let (qs, ks, vs) = (values_f64(query), values_f64(keys), values_f64(values));
    let ms = mask.map(|m| (values_i64(m), dims(m)[0]));
    let mut out = vec![0.0; b * q * hq * dv];
    for bi in 0..b {
        for head in 0..hq {
            let kh = head / rep;
            for i in 0..q {
                let qrow = &qs[((bi * hq + head) * q + i) * d..][..d];
                let mut scores = vec![f64::NEG_INFINITY; n];
                for (t, s) in scores.iter_mut().enumerate() {
                    let visible = match &ms {
                        Some((m, mb)) => m[((if *mb == 1 { 0 } else { bi }) * q + i) * n + t] != 0,
                        None => t < n - q + i + 1,
                    };
                    if visible {
                        let krow = &ks[((bi * h + kh) * n + t) * d..][..d];
                        *s = scaling * qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f64>();
                    }
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let l: f64 = w.iter().sum();
                let dst = &mut out[((bi * q + i) * hq + head) * dv..][..dv];
                for (t, wt) in w.iter().enumerate() {
                    let vrow = &vs[((bi * h + kh) * n + t) * dv..][..dv];
                    for (o, x) in dst.iter_mut().zip(vrow) {
                        *o += wt / l * x;
                    }
                }
            }
        }
    }
    out
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn filled_store(c: QuantConfig, shape: [i64; 4], decode: usize, kind: Kind) -> QuantizedStore {
    let mut store = QuantizedStore::new(c).unwrap();
    let (k, v) = kv(shape, 20, kind);
    store.append(&k, &v).unwrap();
    for step in 0..decode {
        let (k, v) = kv([shape[0], shape[1], 1, shape[3]], 30 + step as u64, kind);
        store.append(&k, &v).unwrap();
    }
    store
}

#[test]
fn attention_equals_attention_over_the_dequantized_tensors() {
    let mut configs = Vec::new();
    for bits in [2u32, 3, 4, 8] {
        configs.push(store_config(bits, 32, 64, 3));
    }
    let mut c = store_config(4, 64, 128, 0);
    c.key_grouping = Grouping::Token;
    c.value_grouping = Grouping::Channel;
    configs.push(c);
    let mut c = store_config(2, 32, 32, 4);
    c.hadamard = true;
    c.outlier_fraction = 0.04;
    configs.push(c);
    let mut c = store_config(3, 32, 0, 0);
    c.key_grouping = Grouping::Token;
    c.hadamard = true;
    configs.push(c);
    for (ci, c) in configs.into_iter().enumerate() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let store = filled_store(c, [2, 2, 300, 64], 7, kind);
            let (dk, dv) = store.dequantize().unwrap();
            for q_len in [1i64, 5] {
                let query = randn(&[2, 6, q_len, 64], 40 + q_len as u64, kind);
                let out = store.attend(&query, None, 0.125).unwrap();
                assert_eq!(out.size(), [2, q_len, 6, 64]);
                assert_eq!(out.kind(), kind);
                let reference = reference_attention(&query, &dk, &dv, None, 0.125);
                // f32: only summation order differs. bf16: the reference reads values
                // rounded to bf16, the kernel the exact dequantized ones.
                let tol = if kind == Kind::Float { 2e-5 } else { 3e-2 };
                let diff = max_abs_diff(&values_f64(&out), &reference);
                assert!(diff < tol, "config {ci} {kind:?} q_len {q_len}: {diff}");
            }
        }
    }
}

#[test]
fn attention_applies_an_explicit_mask() {
    let store = filled_store(store_config(4, 32, 64, 2), [2, 1, 150, 32], 0, Kind::Float);
    let (dk, dv) = store.dequantize().unwrap();
    let query = randn(&[2, 3, 2, 32], 50, Kind::Float);
    // Left padding in row 0: its first 40 tokens are masked; the queries see everything else.
    let m = Tensor::ones([2, 2, 150], (Kind::Bool, CPU));
    let _ = m.get(0).narrow(1, 0, 40).fill_(0);
    let _ = m.get(1).get(0).narrow(0, 149, 1).fill_(0);
    let out = store.attend(&query, Some(&m), 0.3).unwrap();
    let reference = reference_attention(&query, &dk, &dv, Some(&m), 0.3);
    assert!(max_abs_diff(&values_f64(&out), &reference) < 2e-5);
    // A query that may see nothing outputs zeros.
    let none = Tensor::zeros([1, 2, 150], (Kind::Bool, CPU));
    let out = store.attend(&query, Some(&none), 0.3).unwrap();
    assert_eq!(out.abs().max().double_value(&[]), 0.0);
}

#[test]
fn attention_errors() {
    let store = filled_store(store_config(4, 32, 64, 0), [1, 2, 40, 32], 0, Kind::Float);
    let q = |shape: [i64; 4]| randn(&shape, 1, Kind::Float);
    expect_err(store.attend(&q([1, 3, 1, 32]), None, 1.0), "Shape"); // heads not a multiple
    expect_err(store.attend(&q([2, 2, 1, 32]), None, 1.0), "Shape"); // batch
    expect_err(store.attend(&q([1, 2, 1, 16]), None, 1.0), "Shape"); // head_dim
    expect_err(store.attend(&q([1, 2, 41, 32]), None, 1.0), "Shape"); // more queries than tokens
    expect_err(
        store.attend(&q([1, 2, 1, 32]), None, f64::NAN),
        "InvalidArgument",
    );
    let m = Tensor::ones([1, 1, 39], (Kind::Bool, CPU));
    expect_err(store.attend(&q([1, 2, 1, 32]), Some(&m), 1.0), "Shape");
    let m = Tensor::ones([1, 1, 40], (Kind::Float, CPU));
    expect_err(store.attend(&q([1, 2, 1, 32]), Some(&m), 1.0), "Dtype");
    let empty = QuantizedStore::new(store_config(4, 32, 64, 0)).unwrap();
    expect_err(empty.attend(&q([1, 2, 1, 32]), None, 1.0), "State");
}

/// Every finite float16 value in ascending order (the test's own directed rounding: a
/// binary search in this table, independent of the library's bit stepping).
fn finite_f16_values() -> Vec<f32> {
    let mut v: Vec<f32> = (0..=u16::MAX)
        .map(|b| half::f16::from_bits(b).to_f32())
        .filter(|x| x.is_finite())
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.dedup();
    v
}

/// The planar layout of `pack.rs`, written out from its documentation.
fn reference_pack(codes: &[u8], bits: u32) -> Vec<u8> {
    let g = codes.len();
    let plane = |codes: &[u8], width: usize| -> Vec<u8> {
        let n = g * width / 8;
        (0..n)
            .map(|i| (0..8 / width).fold(0u8, |b, k| b | (codes[i + k * n] << (width * k))))
            .collect()
    };
    match bits {
        3 => {
            let low: Vec<u8> = codes.iter().map(|c| c & 3).collect();
            let high: Vec<u8> = codes.iter().map(|c| c >> 2).collect();
            [plane(&low, 2), plane(&high, 1)].concat()
        }
        _ => plane(codes, bits as usize),
    }
}

/// A straightforward scalar quantizer following `group.rs`'s definition, group by group in
/// the layout's order: (packed codes per (b, h), [scale, zero] per group).
fn reference_quantize(x: &Tensor, l: &TensorLayout, table: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let [b, h, t, d] = [0, 1, 2, 3].map(|i| x.size()[i] as usize);
    let xs: Vec<f32> = values_f64(x).iter().map(|&v| v as f32).collect();
    let at = |bi: usize, hi: usize, ti: usize, c: usize| xs[((bi * h + hi) * t + ti) * d + c];
    let g = l.group_size;
    let levels = ((1u32 << l.bits) - 1) as f32;
    let (mut codes, mut params) = (Vec::new(), Vec::new());
    for bi in 0..b {
        for hi in 0..h {
            for t0 in (0..t).step_by(g) {
                // The tile's groups: channel c over the G tokens, or G channels of a token.
                let mut tile_groups: Vec<Vec<f32>> = Vec::new();
                match l.grouping {
                    Grouping::Channel => {
                        for c in 0..d {
                            tile_groups.push((t0..t0 + g).map(|ti| at(bi, hi, ti, c)).collect());
                        }
                    }
                    Grouping::Token => {
                        for ti in t0..t0 + g {
                            for c0 in (0..d).step_by(g) {
                                tile_groups.push((c0..c0 + g).map(|c| at(bi, hi, ti, c)).collect());
                            }
                        }
                    }
                }
                for vals in tile_groups {
                    let mn = vals.iter().cloned().fold(f32::INFINITY, f32::min);
                    let mx = vals.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    // Largest float16 ≤ mn, smallest float16 ≥ the f32 step.
                    let zero = table[table.partition_point(|&v| v <= mn) - 1];
                    let raw = (mx - zero) * (1.0 / levels);
                    let scale = table[table.partition_point(|&v| v < raw)];
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    let group_codes: Vec<u8> = vals
                        .iter()
                        .map(|&v| ((v - zero) * inv).round_ties_even().clamp(0.0, levels) as u8)
                        .collect();
                    codes.extend(reference_pack(&group_codes, l.bits));
                    params.extend([scale, zero]);
                }
            }
        }
    }
    (codes, params)
}

#[test]
fn kernels_equal_a_scalar_reference_quantizer_bit_for_bit() {
    // Shapes the vectorized kernels handle in pieces: head_dim not a multiple of their
    // column blocks (72 for channel groups: neither 16 nor 32 divides it; 224 = 128 + 64
    // + 32, every block of the 16-bit channel path), batch 2, GQA-like head counts,
    // several tiles, and a non-contiguous input (a transposed view, loaded row by row).
    let table = finite_f16_values();
    let mut checked = 0;
    for kind in [Kind::Half, Kind::BFloat16, Kind::Float] {
        for bits in [2u32, 3, 4, 8] {
            for g in [32usize, 64, 128] {
                for (grouping, h, d) in [
                    (Grouping::Channel, 3, 72),
                    (Grouping::Channel, 1, 224),
                    (Grouping::Token, 5, 128),
                ] {
                    let seed = (bits as u64) * 1000 + g as u64;
                    let x = keys_like([2, h, 3 * g as i64, d], seed, kind);
                    let strided =
                        keys_like([2, 3 * g as i64, h, d], seed + 1, kind).transpose(1, 2);
                    for x in [x, strided] {
                        let l = layout(bits, g, grouping, d as usize);
                        let q = QuantizedTensor::quantize(&x, l, "x").unwrap();
                        let (codes, params) = reference_quantize(&x, &l, &table);
                        let got_codes: Vec<u8> =
                            values_i64(q.codes()).iter().map(|&c| c as u8).collect();
                        assert!(
                            got_codes == codes,
                            "{kind:?} bits {bits} g {g} {grouping:?}: codes differ"
                        );
                        let got: Vec<u32> = values_f64(q.params())
                            .iter()
                            .map(|&v| (v as f32).to_bits())
                            .collect();
                        let expected: Vec<u32> = params.iter().map(|v| v.to_bits()).collect();
                        assert!(
                            got == expected,
                            "{kind:?} bits {bits} g {g} {grouping:?}: scales/zeros differ"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 3 * 4 * 3 * 3 * 2);
}
