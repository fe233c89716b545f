//! The fused CPU kernels that replace chains of libtorch ops in the compression path give
//! what the libtorch chains (the path other devices take) give: scores within rounding,
//! and the same kept indices on crafted inputs with clear gaps.

mod common;

use common::*;
use kvpress_rs::policies::{
    score_layer, scorer_from_name, ExpectedAttention, Params, ScoreContext, Scorer,
};
use kvpress_rs::quant::simd::native_bf16_matmul;
use kvpress_rs::rope::{Rope, RopeSpec};
use kvpress_rs::select::{
    adakv_rows, adakv_rows_libtorch, top_k_indices, top_k_indices_cpu, top_k_indices_f32,
};
use kvpress_rs::tensor::set_cpu_kernels;
use ndarray::Array3;
use tch::{Device, Kind, Tensor};

/// Runs `f` with the fused CPU kernels switched off (the libtorch path), then on again.
fn libtorch_path<R>(f: impl FnOnce() -> R) -> R {
    set_cpu_kernels(false);
    let out = f();
    set_cpu_kernels(true);
    out
}

/// (batch, heads, tokens, dim) in the layout transformers hands over: token-major memory
/// ((batch, tokens, heads, dim) transposed), as the kernels meet it in a model.
fn token_major(seed: u64, b: i64, h: i64, t: i64, d: i64, kind: Kind) -> Tensor {
    randn(&[b, t, h, d], seed, Kind::Float)
        .to_kind(kind)
        .transpose(1, 2)
}

#[track_caller]
fn assert_all_close(got: &Tensor, want: &Tensor, rel: f64, abs: f64) {
    let (g, w) = (values_f64(got), values_f64(want));
    assert_eq!(got.size(), want.size());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= rel * b.abs() + abs,
            "element {i}: kernel {a}, libtorch {b}"
        );
    }
}

fn score_both(
    scorer: &dyn Scorer,
    k: &Tensor,
    v: &Tensor,
    q: Option<&Tensor>,
    rope: Option<&Rope>,
) -> (Tensor, Tensor) {
    let ctx = ScoreContext::prefill(0, 1);
    let fused = score_layer(scorer, k, v, q, rope, &ctx).unwrap();
    let chain = libtorch_path(|| score_layer(scorer, k, v, q, rope, &ctx).unwrap());
    (fused, chain)
}

#[test]
fn keydiff_kernel_equals_the_libtorch_chain() {
    let keydiff = scorer_from_name("keydiff", Params::new()).unwrap();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let k = token_major(1, 2, 3, 97, 64, kind);
        let (fused, chain) = score_both(keydiff.as_ref(), &k, &k, None, None);
        assert_eq!(fused.kind(), Kind::Float);
        assert_all_close(&fused, &chain, 1e-5, 1e-6);
        // contiguous keys give the same scores as the token-major view
        let (contig, _) = score_both(keydiff.as_ref(), &k.contiguous(), &k, None, None);
        assert_all_close(&contig, &fused, 1e-6, 1e-7);
    }
}

#[test]
fn keydiff_kernel_keeps_the_keys_pointing_away() {
    // 30 keys along one direction (small jitter), three pointing elsewhere: those three
    // are the least similar to the mean direction, in both paths.
    let jitter = randn(&[1, 1, 33, 16], 3, Kind::Float) * 0.01;
    let k: Tensor = Tensor::ones([1, 1, 33, 16], (Kind::Float, Device::Cpu)) + jitter;
    for (tok, sign) in [(4, -1.0), (17, -2.0), (29, -0.5)] {
        let _ = k.narrow(2, tok, 1).fill_(sign);
    }
    let keydiff = scorer_from_name("keydiff", Params::new()).unwrap();
    let (fused, chain) = score_both(keydiff.as_ref(), &k, &k, None, None);
    let kept = values_i64(&top_k_indices(&fused, 3).unwrap());
    assert_eq!(kept, vec![4, 17, 29]);
    assert_eq!(values_i64(&top_k_indices(&chain, 3).unwrap()), kept);
}

#[test]
fn expected_attention_kernel_equals_the_libtorch_chain() {
    let rope = Rope::new(RopeSpec::new(32, 10_000.0)).unwrap();
    for (cov, vnorm) in [(true, true), (false, true), (true, false)] {
        let ea = ExpectedAttention::new(16, 4, cov, vnorm, 0.0).unwrap();
        for kind in [Kind::Float, Kind::BFloat16] {
            let k = token_major(7, 1, 2, 80, 32, kind);
            let v = token_major(8, 1, 2, 80, 32, kind);
            let q = token_major(9, 1, 6, 80, 32, kind);
            let (fused, chain) = score_both(&ea, &k, &v, Some(&q), Some(&rope));
            // bf16 models on CPUs that multiply bf16 natively take the covariance term's
            // products in bf16 (results rounded to 2⁻⁹): that term (~0.5 here) moves by
            // its rounding, a weight by about twice that
            let rel = match kind == Kind::BFloat16 && native_bf16_matmul() {
                true => 1e-2,
                false => 1e-4,
            };
            assert_all_close(&fused, &chain, rel, 1e-7);
        }
    }
}

#[test]
fn expected_attention_kernel_keeps_the_key_the_queries_expect() {
    // every query leans along channel 7 (pre-RoPE), the slowest-rotating pair, so the
    // few positions between key 40 and the expected queries barely turn it; key 40 is
    // that direction, large: both paths keep it first after the sinks.
    let rope = Rope::new(RopeSpec::new(16, 10_000.0)).unwrap();
    let pre = randn(&[1, 4, 60, 16], 11, Kind::Float) * 0.1;
    let _ = pre.narrow(3, 7, 1).fill_(3.0);
    let q = rope
        .apply(&pre, &Tensor::arange(60, (Kind::Int64, Device::Cpu)), None)
        .unwrap();
    let keys_pre = randn(&[1, 2, 60, 16], 12, Kind::Float) * 0.1;
    let _ = keys_pre.narrow(2, 40, 1).narrow(3, 7, 1).fill_(5.0);
    let k = rope
        .apply(
            &keys_pre,
            &Tensor::arange(60, (Kind::Int64, Device::Cpu)),
            None,
        )
        .unwrap();
    let v = Tensor::ones([1, 2, 60, 16], (Kind::Float, Device::Cpu));
    let ea = ExpectedAttention::new(8, 4, true, true, 0.0).unwrap();
    let (fused, chain) = score_both(&ea, &k, &v, Some(&q), Some(&rope));
    let kept = values_i64(&top_k_indices(&fused, 5).unwrap());
    assert_eq!(kept, values_i64(&top_k_indices(&chain, 5).unwrap()));
    for h in 0..2 {
        assert!(
            kept[h * 5..(h + 1) * 5].contains(&40),
            "head {h} keeps {kept:?}"
        );
    }
}

#[test]
fn window_attention_kernels_equal_the_libtorch_chain() {
    // TOVA (one query per head: the direct dot products) and SnapKV (a window: the GEMM),
    // in every dtype; bf16 and f16 scores are rounded alike by both paths.
    for name in ["tova", "snapkv"] {
        let scorer = scorer_from_name(name, Params::new()).unwrap();
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let k = token_major(21, 1, 3, 150, 64, kind);
            let q = token_major(22, 1, 9, 150, 64, kind);
            let (fused, chain) = score_both(scorer.as_ref(), &k, &k, Some(&q), None);
            let tol = if kind == Kind::Float { 1e-5 } else { 1e-2 };
            assert_all_close(
                &fused.to_kind(Kind::Float),
                &chain.to_kind(Kind::Float),
                tol,
                1e-6,
            );
        }
    }
}

#[test]
fn lagkv_kernel_reads_token_major_keys() {
    let lagkv = scorer_from_name("lagkv", Params::new()).unwrap();
    let k = token_major(31, 1, 3, 600, 64, Kind::BFloat16);
    let v = token_major(32, 1, 3, 600, 64, Kind::BFloat16);
    let (strided, chain) = score_both(lagkv.as_ref(), &k, &v, None, None);
    let (contig, _) = score_both(lagkv.as_ref(), &k.contiguous(), &v.contiguous(), None, None);
    assert!(strided.equal(&contig));
    // ranks within a partition: a near-tie of two spreads (float32 sums in another order
    // than libtorch's) may swap two neighbours' ranks; anything else would show as many
    // differences
    let (a, b) = (values_f64(&strided), values_f64(&chain));
    let differ = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| (*x - *y).abs() > 1e-6)
        .count();
    assert!(
        differ * 200 < a.len(),
        "{differ} of {} scores differ",
        a.len()
    );
}

#[test]
fn integer_key_top_k_equals_the_comparator_kernel() {
    // ties everywhere (three values), signed zeros, infinities
    let mut rng = Rng::new(5);
    let (b, h, t) = (2, 3, 257);
    let pool = [
        0.0f32,
        -0.0,
        1.5,
        -2.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.5,
    ];
    let scores = Array3::from_shape_fn((b, h, t), |_| pool[(rng.next_u64() % 7) as usize]);
    for k in [1, 5, 100, 256, 257] {
        let mut fast = Array3::<i64>::zeros((b, h, k));
        let mut slow = Array3::<i64>::zeros((b, h, k));
        top_k_indices_f32(scores.view(), fast.view_mut()).unwrap();
        top_k_indices_cpu(scores.view(), slow.view_mut()).unwrap();
        assert_eq!(fast, slow, "k = {k}");
    }
    let mut nan = scores.clone();
    nan[[1, 2, 3]] = f32::NAN;
    let mut out = Array3::<i64>::zeros((b, h, 4));
    assert!(top_k_indices_f32(nan.view(), out.view_mut()).is_err());
}

#[test]
fn adakv_selection_equals_the_sorting_formulation() {
    for (seed, levels) in [(1u64, 1000), (2, 3)] {
        // few levels: ties across heads and tokens decide most of the selection
        let mut rng = Rng::new(seed);
        let v: Vec<f64> = (0..2 * 4 * 90)
            .map(|_| (rng.next_u64() % levels) as f64)
            .collect();
        let scores = tensor_f64(&v, &[2, 4, 90], Kind::Float);
        for (n_kept, alpha) in [(30, 0.2), (1, 0.5), (90, 0.2), (45, 0.0), (20, 1.0)] {
            let fast = adakv_rows(&scores, n_kept, alpha).unwrap();
            let slow = adakv_rows_libtorch(&scores, n_kept, alpha).unwrap();
            assert_eq!(fast.len(), slow.len());
            for (a, b) in fast.iter().zip(&slow) {
                assert_eq!(
                    values_i64(a),
                    values_i64(b),
                    "n_kept {n_kept}, alpha {alpha}"
                );
            }
            let total: usize = fast[..4].iter().map(|r| r.numel()).sum();
            assert_eq!(total, 4 * n_kept);
        }
    }
}
