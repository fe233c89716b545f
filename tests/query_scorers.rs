//! The query-aware scorers — SnapKV, TOVA, ObservedAttention (H2O), CAKE,
//! ExpectedAttention and TriAttention — against references written here from each
//! method's definition with plain libtorch ops (in the dtype chain of eager attention and
//! kvpress where the scorer follows it), on random inputs; and, on crafted inputs, the
//! exact tokens each one keeps.

mod common;

use common::*;
use kvpress_rs::policies::{
    score_layer, scorer_from_name, ParamValue, Params, ScoreContext, Scorer,
};
use kvpress_rs::rope::{Rope, RopeSpec, ScalingParams};
use kvpress_rs::select::top_k_indices;
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------------------
// Shared pieces of the references and the checks
// ---------------------------------------------------------------------------------------

fn scorer(name: &str, params: &[(&str, ParamValue)]) -> Box<dyn Scorer> {
    let params = Params::from_pairs(
        params
            .iter()
            .map(|(name, value)| (name.to_string(), value.clone())),
    );
    scorer_from_name(name, params).unwrap()
}

/// The scores of a prefill (stored tokens = positions 0..T) given the queries of every
/// prompt token.
fn prefill_scores(s: &dyn Scorer, keys: &Tensor, values: &Tensor, queries: &Tensor) -> Tensor {
    score_layer(
        s,
        keys,
        values,
        Some(queries),
        None,
        &ScoreContext::prefill(0, 1),
    )
    .unwrap()
}

fn prefill_scores_with_rope(
    s: &dyn Scorer,
    keys: &Tensor,
    values: &Tensor,
    queries: &Tensor,
    rope: &Rope,
) -> Tensor {
    let ctx = ScoreContext::prefill(0, 1);
    score_layer(s, keys, values, Some(queries), Some(rope), &ctx).unwrap()
}

/// Queries (1, hk·g, t, d), keys and values (1, hk, t, d): independent standard normals.
fn random_qkv(hk: i64, g: i64, t: i64, d: i64, seed: u64, kind: Kind) -> (Tensor, Tensor, Tensor) {
    (
        randn(&[1, hk * g, t, d], seed, kind),
        randn(&[1, hk, t, d], seed + 1, kind),
        randn(&[1, hk, t, d], seed + 2, kind),
    )
}

/// torch.testing.assert_close's rule, element by element: |got − want| ≤ atol + rtol·|want|.
#[track_caller]
fn assert_close(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(got.size(), want.size(), "shapes differ");
    let (got, want) = (values_f64(got), values_f64(want));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "element {i}: got {g}, want {w} (difference {:e})",
            (g - w).abs()
        );
    }
}

/// The kept token indices of every (batch, head) row, ascending.
fn kept_rows(scores: &Tensor, k: usize) -> Vec<Vec<i64>> {
    let kept = values_i64(&top_k_indices(&scores.to_kind(Kind::Float), k).unwrap());
    kept.chunks(k).map(|row| row.to_vec()).collect()
}

/// Keys (b, hk, T, d) repeated for each KV head's g query heads: query head h reads KV
/// head h / g.
fn repeat_kv(keys: &Tensor, g: i64) -> Tensor {
    keys.repeat_interleave_self_int(g, 1, None)
}

/// Mean over each KV head's group of query heads: (b, hk·g, n) → (b, hk, n), in the
/// input's dtype.
fn group_mean(x: &Tensor, hk: i64) -> Tensor {
    let s = x.size();
    x.view([s[0], hk, s[1] / hk, s[2]])
        .mean_dim(2, false, None::<Kind>)
}

/// kvpress makes a selection keep tokens first by scoring them the global maximum + 1.
fn protected_scores(scores: &Tensor, n: i64) -> Tensor {
    let top = scores.max().double_value(&[]) + 1.0;
    let s = scores.size();
    Tensor::full([s[0], s[1], n], top, (scores.kind(), Device::Cpu))
}

/// `scores` followed by `n` protected tokens (a window at the end of the prompt).
fn then_protected(scores: &Tensor, n: i64) -> Tensor {
    Tensor::cat(&[scores, &protected_scores(scores, n)], -1)
}

/// `n` protected tokens (sinks at the start of the prompt) followed by `scores`.
fn protected_then(scores: &Tensor, n: i64) -> Tensor {
    Tensor::cat(&[&protected_scores(scores, n), scores], -1)
}

/// Eager attention of `q_win` (b, h, w, d), the queries of the last w of T tokens, over
/// all T keys (b, hk, T, d), causal: logits q·k/√d in the inputs' dtype, softmax in
/// float32, weights cast back to the inputs' dtype. (b, h, w, T).
fn ref_window_attention(q_win: &Tensor, keys: &Tensor) -> Tensor {
    let (w, d) = (q_win.size()[2], q_win.size()[3]);
    let t = keys.size()[2];
    let kk = repeat_kv(keys, q_win.size()[1] / keys.size()[1]);
    let logits = q_win.matmul(&kk.transpose(-1, -2)) / (d as f64).sqrt();
    // query i sits at position T − w + i: keys after it are its future
    let future = Tensor::ones([w, t], (Kind::Bool, Device::Cpu)).triu(t - w + 1);
    logits
        .masked_fill(&future, f64::NEG_INFINITY)
        .softmax(-1, Kind::Float)
        .to_kind(q_win.kind())
}

/// The last `w` of the queries (b, h, T, d).
fn last_queries(queries: &Tensor, w: i64) -> Tensor {
    queries.narrow(2, queries.size()[2] - w, w)
}

// ---------------------------------------------------------------------------------------
// SnapKV
// ---------------------------------------------------------------------------------------

/// SnapKV: the window's attention to the T − w tokens before it, averaged over the
/// window's queries, average-pooled over `kernel` neighbours (zero padding counted),
/// averaged over each KV head's group; the window is protected.
fn ref_snapkv(queries: &Tensor, keys: &Tensor, window: i64, kernel: i64) -> Tensor {
    let (hk, t) = (keys.size()[1], keys.size()[2]);
    let attn = ref_window_attention(&last_queries(queries, window), keys).narrow(-1, 0, t - window);
    let mean = attn.mean_dim(2, false, None::<Kind>);
    let pooled = mean.avg_pool1d([kernel], [1], [kernel / 2], false, true);
    then_protected(&group_mean(&pooled, hk), window)
}

fn snapkv(window: i64, kernel: i64) -> Box<dyn Scorer> {
    scorer(
        "snapkv",
        &[
            ("window_size", ParamValue::Int(window)),
            ("kernel_size", ParamValue::Int(kernel)),
        ],
    )
}

#[test]
fn snapkv_scores_match_the_reference_f32() {
    let (q, k, v) = random_qkv(2, 3, 40, 16, 0, Kind::Float);
    for (window, kernel) in [(8, 5), (4, 3), (1, 1)] {
        let s = snapkv(window, kernel);
        let ours = prefill_scores(s.as_ref(), &k, &v, &q);
        // the products sum in another order than the reference's matmul: rounding only
        assert_close(&ours, &ref_snapkv(&q, &k, window, kernel), 1e-6, 1e-8);
        for row in kept_rows(&ours, 20) {
            for token in 40 - window..40 {
                assert!(
                    row.contains(&token),
                    "window token {token} evicted: {row:?}"
                );
            }
        }
    }
}

#[test]
fn snapkv_bf16_scores_equal_the_reference_chain() {
    // rounded to bf16 after every step of the same chain, the scores come out identical
    let (q, k, v) = random_qkv(2, 3, 40, 16, 10, Kind::BFloat16);
    for (window, kernel) in [(8, 5), (4, 3), (1, 1)] {
        let ours = prefill_scores(snapkv(window, kernel).as_ref(), &k, &v, &q);
        assert_eq!(ours.kind(), Kind::BFloat16);
        assert_close(&ours, &ref_snapkv(&q, &k, window, kernel), 0.0, 0.0);
    }
}

#[test]
fn snapkv_keeps_the_token_the_window_attends_to() {
    let (q, k, v) = random_qkv(2, 3, 50, 16, 20, Kind::Float);
    // positive queries against a large positive key: every window query of KV head 1's
    // group puts almost all its attention on token 12
    let q = q.abs();
    let _ = k.get(0).get(1).get(12).fill_(50.0);
    let window: Vec<i64> = (42..50).collect();
    let ours = prefill_scores(snapkv(8, 1).as_ref(), &k, &v, &q);
    let kept = kept_rows(&ours, 9);
    assert_eq!(kept[1], [&[12][..], &window].concat());
    assert!(
        !kept[0].contains(&12),
        "head 0 has no reason to keep 12: {kept:?}"
    );
    // pooling spreads token 12's score over its 5 neighbours, who then outrank the rest
    let ours = prefill_scores(snapkv(8, 5).as_ref(), &k, &v, &q);
    let kept = kept_rows(&ours, 13);
    assert_eq!(kept[1], [&[10, 11, 12, 13, 14][..], &window].concat());
}

// ---------------------------------------------------------------------------------------
// TOVA
// ---------------------------------------------------------------------------------------

/// TOVA: the last query's attention to the tokens before it, averaged over every query
/// head and shared by all KV heads; the last token is protected.
fn ref_tova(queries: &Tensor, keys: &Tensor) -> Tensor {
    let (hk, t) = (keys.size()[1], keys.size()[2]);
    let attn = ref_window_attention(&last_queries(queries, 1), keys).narrow(-1, 0, t - 1);
    let shared = attn.mean_dim(1, false, None::<Kind>); // (b, 1, t − 1)
    then_protected(&shared.expand([1, hk, t - 1], false).contiguous(), 1)
}

#[test]
fn tova_scores_match_the_reference() {
    let (q, k, v) = random_qkv(2, 3, 30, 16, 30, Kind::Float);
    let ours = prefill_scores(scorer("tova", &[]).as_ref(), &k, &v, &q);
    assert_close(&ours, &ref_tova(&q, &k), 1e-6, 1e-8);
    let kept = kept_rows(&ours, 15);
    assert_eq!(kept[0], kept[1], "TOVA's heads share one ranking");
    assert_eq!(kept[0].last(), Some(&29));
}

#[test]
fn tova_keeps_a_token_one_group_attends_to_in_every_head() {
    let (q, k, v) = random_qkv(2, 3, 30, 16, 40, Kind::Float);
    // only KV head 0's group attends to token 7, but the heads share the mean over all
    // query heads: both keep it
    let q = q.abs();
    let _ = k.get(0).get(0).get(7).fill_(50.0);
    let ours = prefill_scores(scorer("tova", &[]).as_ref(), &k, &v, &q);
    assert_eq!(kept_rows(&ours, 2), vec![vec![7, 29], vec![7, 29]]);
}

// ---------------------------------------------------------------------------------------
// ObservedAttention (H2O)
// ---------------------------------------------------------------------------------------

/// H2O: the full causal attention matrix of eager attention (logits in the inputs'
/// dtype, softmax in float32, weights cast back), the attention each token received summed
/// over the queries, divided by the T − j queries that can see token j, averaged over each
/// KV head's group.
fn ref_observed_attention(queries: &Tensor, keys: &Tensor) -> Tensor {
    let (hk, t, d) = (keys.size()[1], keys.size()[2], keys.size()[3]);
    let kind = queries.kind();
    let kk = repeat_kv(keys, queries.size()[1] / hk);
    let logits = queries.matmul(&kk.transpose(-1, -2)) * (d as f64).powf(-0.5);
    let future = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
    let weights = logits
        .masked_fill(&future, f64::NEG_INFINITY)
        .softmax(-1, Kind::Float)
        .to_kind(kind);
    let received = weights.sum_dim_intlist(2, false, None::<Kind>);
    let observers = Tensor::arange_start_step(t, 0, -1, (Kind::Int64, Device::Cpu)).to_kind(kind);
    group_mean(&(received / observers), hk)
}

#[test]
fn observed_attention_matches_eager_attention_weights() {
    for (kind, tol) in [(Kind::Float, 1e-6), (Kind::BFloat16, 1e-2)] {
        let (q, k, v) = random_qkv(2, 3, 33, 16, 50, kind);
        let want = ref_observed_attention(&q, &k);
        // chunks of 7 queries split the matrix unevenly: the sums must not depend on it
        for chunk in [512, 7] {
            let s = scorer(
                "observed_attention",
                &[("chunk_size", ParamValue::Int(chunk))],
            );
            let ours = prefill_scores(s.as_ref(), &k, &v, &q);
            assert_close(&ours, &want, tol, tol);
        }
    }
}

#[test]
fn observed_attention_keeps_a_crafted_heavy_hitter() {
    let (q, k, v) = random_qkv(2, 3, 40, 16, 60, Kind::Float);
    // every query of KV head 0's group from position 5 on attends to token 5 alone
    let q = q.abs();
    let _ = k.get(0).get(0).get(5).fill_(30.0);
    let s = scorer("observed_attention", &[]);
    let ours = prefill_scores(s.as_ref(), &k, &v, &q);
    assert_eq!(kept_rows(&ours, 1)[0], vec![5]);
    let want = values_f64(&ref_observed_attention(&q, &k));
    assert_eq!(
        kept_rows(&ours, 3).concat(),
        reference_top_k_rows(&want, 40, 3)
    );
}

// ---------------------------------------------------------------------------------------
// CAKE
// ---------------------------------------------------------------------------------------

/// CAKE's eviction indicator: over the window's attention to the tokens before it, the
/// mean plus gamma × the (unbiased) variance across the window's queries, average-pooled,
/// averaged over each KV head's group; the window is protected.
fn ref_cake(queries: &Tensor, keys: &Tensor, window: i64, kernel: i64, gamma: f64) -> Tensor {
    let (hk, t) = (keys.size()[1], keys.size()[2]);
    let attn = ref_window_attention(&last_queries(queries, window), keys).narrow(-1, 0, t - window);
    let indicator = attn.mean_dim(2, false, None::<Kind>) + attn.var_dim(2, true, false) * gamma;
    let pooled = indicator.avg_pool1d([kernel], [1], [kernel / 2], false, true);
    then_protected(&group_mean(&pooled, hk), window)
}

fn cake(window: i64, kernel: i64, gamma: f64) -> Box<dyn Scorer> {
    scorer(
        "cake",
        &[
            ("window_size", ParamValue::Int(window)),
            ("kernel_size", ParamValue::Int(kernel)),
            ("gamma", ParamValue::Float(gamma)),
        ],
    )
}

#[test]
fn cake_indicator_matches_the_reference() {
    let (q, k, v) = random_qkv(2, 3, 40, 16, 70, Kind::Float);
    for (window, kernel, gamma) in [(8, 5, 200.0), (4, 3, 0.0), (2, 1, 10.0)] {
        let ours = prefill_scores(cake(window, kernel, gamma).as_ref(), &k, &v, &q);
        let want = ref_cake(&q, &k, window, kernel, gamma);
        assert_close(&ours, &want, 1e-6, 1e-6);
    }
}

#[test]
fn cake_variance_keeps_a_token_with_shifting_attention() {
    // one head, d = 2, keys zero but token 5 along e0 and token 10 along e1; window of 4:
    // the first window query looks only at token 5 (attention 1, 0, 0, 0 — mean 0.26,
    // variance 0.24), the three others give token 10 about half of theirs (0, ½, ½, ½ —
    // mean 0.38, variance 0.06)
    let (t, w) = (30i64, 4i64);
    let keys = Tensor::zeros([1, 1, t, 2], (Kind::Float, Device::Cpu));
    let _ = keys.get(0).get(0).get(5).get(0).fill_(1.0);
    let _ = keys.get(0).get(0).get(10).get(1).fill_(1.0);
    let queries = Tensor::zeros([1, 1, t, 2], (Kind::Float, Device::Cpu));
    let sqrt2 = 2f64.sqrt();
    let _ = queries.get(0).get(0).get(t - w).get(0).fill_(20.0 * sqrt2);
    let _ = queries
        .get(0)
        .get(0)
        .narrow(0, t - w + 1, w - 1)
        .narrow(1, 1, 1)
        .fill_(28f64.ln() * sqrt2);
    let values = Tensor::ones([1, 1, t, 2], (Kind::Float, Device::Cpu));
    let window: Vec<i64> = (t - w..t).collect();
    // the mean alone prefers the steady token, the variance the shifting one
    let steady = prefill_scores(cake(w, 1, 0.0).as_ref(), &keys, &values, &queries);
    assert_eq!(kept_rows(&steady, 5)[0], [&[10][..], &window].concat());
    let shifting = prefill_scores(cake(w, 1, 200.0).as_ref(), &keys, &values, &queries);
    assert_eq!(kept_rows(&shifting, 5)[0], [&[5][..], &window].concat());
}

// ---------------------------------------------------------------------------------------
// ExpectedAttention
// ---------------------------------------------------------------------------------------

/// Default RoPE's frequencies θ_f = base^(−2f/d), f < d/2, from their definition.
fn default_frequencies(base: f64, d: i64) -> Vec<f64> {
    (0..d / 2)
        .map(|f| base.powf(-2.0 * f as f64 / d as f64))
        .collect()
}

/// R̄ = the mean over positions p in [start, start + n) of RoPE's rotation at p in the
/// rotate-half layout, R(p)x = cos(pθ) ⊙ x + sin(pθ) ⊙ rotate_half(x): R̄ = diag(c̄) +
/// diag(s̄)·M with M x = rotate_half(x) = (−x₂, x₁). (d, d) float64.
fn ref_mean_rotation(inv_freq: &[f64], start: i64, n: i64) -> Tensor {
    let half = inv_freq.len() as i64;
    let d = 2 * half;
    let mean_of = |f: fn(f64) -> f64| -> Vec<f64> {
        let per_pair: Vec<f64> = inv_freq
            .iter()
            .map(|&w| (start..start + n).map(|p| f(p as f64 * w)).sum::<f64>() / n as f64)
            .collect();
        [per_pair.clone(), per_pair].concat() // channel f and f + d/2 share θ_f
    };
    let c = Tensor::from_slice(&mean_of(f64::cos));
    let s = Tensor::from_slice(&mean_of(f64::sin));
    let eye = Tensor::eye(d, (Kind::Double, Device::Cpu));
    let rotate_half = Tensor::cat(&[-eye.narrow(0, half, half), eye.narrow(0, 0, half)], 0);
    c.diag(0) + s.diag(0).matmul(&rotate_half)
}

struct ExpectedAttentionCase {
    n_future: i64,
    n_sink: i64,
    use_covariance: bool,
    use_vnorm: bool,
    epsilon: f64,
}

/// ExpectedAttention from its definition, in float64: the pre-RoPE queries after the
/// sinks have mean μ and covariance Σ (÷ n) per query head; moved to the future by R̄
/// (positions T..T + n_future), a key's expected logit is kᵀR̄μ/√d + kᵀR̄ΣR̄ᵀk/(2d);
/// softmax over the keys after the sinks, mean over each KV head's group, then
/// (· + ε)·‖v‖; the sinks are protected.
fn ref_expected_attention(
    pre_queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    inv_freq: &[f64],
    case: &ExpectedAttentionCase,
) -> Tensor {
    let (h, t, d) = (
        pre_queries.size()[1],
        pre_queries.size()[2],
        pre_queries.size()[3],
    );
    let hk = keys.size()[1];
    let (sink, n) = (case.n_sink, t - case.n_sink);
    let x = pre_queries.narrow(2, sink, n).to_kind(Kind::Double);
    let mu = x.mean_dim(2, true, None::<Kind>); // (1, h, 1, d)
    let centered = &x - &mu;
    let sigma = centered.transpose(-1, -2).matmul(&centered) / n as f64;
    let r = ref_mean_rotation(inv_freq, t, case.n_future);
    let mu_future = mu.matmul(&r.transpose(0, 1)); // rows R̄μ
    let kk = repeat_kv(&keys.narrow(2, sink, n).to_kind(Kind::Double), h / hk);
    let mut logits = kk.matmul(&mu_future.transpose(-1, -2)).squeeze_dim(-1) / (d as f64).sqrt();
    if case.use_covariance {
        let sigma_future = r.matmul(&sigma).matmul(&r.transpose(0, 1));
        let quadratic = (kk.matmul(&sigma_future) * &kk).sum_dim_intlist(-1, false, None::<Kind>);
        logits += quadratic / (2 * d) as f64;
    }
    let mut scores = group_mean(&logits.softmax(-1, Kind::Double), hk);
    if case.use_vnorm {
        let vnorm = values
            .narrow(2, sink, n)
            .to_kind(Kind::Double)
            .norm_scalaropt_dim(2.0, [-1i64], false);
        scores = (scores + case.epsilon) * vnorm;
    }
    protected_then(&scores, sink)
}

fn expected_attention(case: &ExpectedAttentionCase) -> Box<dyn Scorer> {
    scorer(
        "expected_attention",
        &[
            ("n_future_positions", ParamValue::Int(case.n_future)),
            ("n_sink", ParamValue::Int(case.n_sink)),
            ("use_covariance", ParamValue::Bool(case.use_covariance)),
            ("use_vnorm", ParamValue::Bool(case.use_vnorm)),
            ("epsilon", ParamValue::Float(case.epsilon)),
        ],
    )
}

fn positions(t: i64) -> Tensor {
    Tensor::arange(t, (Kind::Int64, Device::Cpu))
}

#[test]
fn expected_attention_matches_the_reference() {
    let (t, d, base) = (40i64, 16i64, 1000.0);
    let rope = Rope::new(RopeSpec::new(d as usize, base)).unwrap();
    // queries concentrated around a center, as real ones are
    let pre_q = randn(&[1, 6, t, d], 80, Kind::Float) + 0.5;
    let q = rope.apply(&pre_q, &positions(t), None).unwrap();
    let k = rope
        .apply(&randn(&[1, 2, t, d], 81, Kind::Float), &positions(t), None)
        .unwrap();
    let v = randn(&[1, 2, t, d], 82, Kind::Float);
    let cases = [
        (16, 4, true, true, 0.0),
        (16, 4, false, true, 0.0),
        (16, 4, true, false, 0.0),
        (16, 4, true, true, 0.25),
        (512, 0, true, true, 0.0),
    ];
    for (n_future, n_sink, use_covariance, use_vnorm, epsilon) in cases {
        let case = ExpectedAttentionCase {
            n_future,
            n_sink,
            use_covariance,
            use_vnorm,
            epsilon,
        };
        let ours = prefill_scores_with_rope(expected_attention(&case).as_ref(), &k, &v, &q, &rope);
        let want = ref_expected_attention(&pre_q, &k, &v, &default_frequencies(base, d), &case);
        // float32 statistics and logits against float64 ones
        assert_close(&ours, &want, 1e-4, 1e-6);
    }
}

#[test]
fn expected_attention_keeps_the_expected_key_weighed_by_its_value_norm() {
    // every pre-RoPE query leans along channel 7, the slowest-turning pair, which the few
    // positions between the keys and the future queries barely rotate; keys 40 and 45
    // point the same way, but value 45 is tiny
    let (t, d) = (60i64, 16i64);
    let rope = Rope::new(RopeSpec::new(d as usize, 10_000.0)).unwrap();
    let pre_q = randn(&[1, 4, t, d], 90, Kind::Float) * 0.1;
    let _ = pre_q.narrow(3, 7, 1).fill_(3.0);
    let pre_k = randn(&[1, 2, t, d], 91, Kind::Float) * 0.1;
    for token in [40, 45] {
        let _ = pre_k.narrow(2, token, 1).narrow(3, 7, 1).fill_(5.0);
    }
    let q = rope.apply(&pre_q, &positions(t), None).unwrap();
    let k = rope.apply(&pre_k, &positions(t), None).unwrap();
    let v = Tensor::ones([1, 2, t, d], (Kind::Float, Device::Cpu));
    let _ = v.narrow(2, 45, 1).fill_(0.01);
    let case = |use_vnorm| ExpectedAttentionCase {
        n_future: 8,
        n_sink: 4,
        use_covariance: true,
        use_vnorm,
        epsilon: 0.0,
    };
    let attention_only =
        prefill_scores_with_rope(expected_attention(&case(false)).as_ref(), &k, &v, &q, &rope);
    assert_eq!(
        kept_rows(&attention_only, 6),
        vec![vec![0, 1, 2, 3, 40, 45]; 2]
    );
    let with_vnorm =
        prefill_scores_with_rope(expected_attention(&case(true)).as_ref(), &k, &v, &q, &rope);
    assert_eq!(kept_rows(&with_vnorm, 5), vec![vec![0, 1, 2, 3, 40]; 2]);
    for row in kept_rows(&with_vnorm, 6) {
        assert!(
            !row.contains(&45),
            "a key with a tiny value was kept: {row:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// TriAttention
// ---------------------------------------------------------------------------------------

struct TriAttentionCase {
    n_offsets: i64,
    normalize: bool,
    aggregation: &'static str,
}

/// TriAttention's series evaluated directly, in float64, key by key, from the pre-RoPE
/// queries and keys (rotate-half pairs f, f + R/2 of the R rotated channels as complex
/// numbers). With the query center q̄_f = mean q_f and mean magnitude m_f = mean |q_f|:
///
/// ```text
/// Σ_f |q̄_f||k_f| cos(ω_f (T − p + δ) + arg(q̄_f·conj k_f))   averaged over δ = 1, 2, …, 2^(n−1)
///   + Σ_f (m_f − |q̄_f|)·|k_f|
///   + Σ_c mean(q_c)·k_c + (mean |q_c| − |mean q_c|)·|k_c|    over the unrotated channels c
/// ```
///
/// (a real channel's term is the ω = 0 case of a pair's), z-normalised over the keys per
/// query head (population std) if `normalize`, then the max or mean over each KV head's
/// group.
fn ref_triattention(
    pre_queries: &Tensor,
    pre_keys: &Tensor,
    rotary: i64,
    inv_freq: &[f64],
    case: &TriAttentionCase,
) -> Tensor {
    let (h, t, d) = (
        pre_queries.size()[1],
        pre_queries.size()[2],
        pre_queries.size()[3],
    );
    let hk = pre_keys.size()[1];
    let f = rotary / 2;
    let q = pre_queries.to_kind(Kind::Double);
    let k = repeat_kv(&pre_keys.to_kind(Kind::Double), h / hk);
    let modulus = |re: &Tensor, im: &Tensor| (re.square() + im.square()).sqrt();
    let (q_re, q_im) = (q.narrow(-1, 0, f), q.narrow(-1, f, f));
    let center_re = q_re.mean_dim(2, true, None::<Kind>); // (1, h, 1, F)
    let center_im = q_im.mean_dim(2, true, None::<Kind>);
    let magnitude = modulus(&q_re, &q_im).mean_dim(2, true, None::<Kind>);
    let center_abs = modulus(&center_re, &center_im);
    let (k_re, k_im) = (k.narrow(-1, 0, f), k.narrow(-1, f, f)); // (1, h, T, F)
    let k_abs = modulus(&k_re, &k_im);
    // q̄·conj(k): its angle is the phase, its modulus the amplitude of the cosine
    let prod_re = &center_re * &k_re + &center_im * &k_im;
    let prod_im = &center_im * &k_re - &center_re * &k_im;
    let phase = prod_im.atan2(&prod_re);
    let amplitude = &center_abs * &k_abs;
    // (T, δ): the distance T − p + δ from the key at p to the future query at T + δ
    let offsets: Vec<f64> = (0..case.n_offsets).map(|i| 2f64.powi(i as i32)).collect();
    let distance = Tensor::arange_start_step(t, 0, -1, (Kind::Double, Device::Cpu)).unsqueeze(1)
        + Tensor::from_slice(&offsets).unsqueeze(0);
    let omega = Tensor::from_slice(inv_freq);
    let angle = omega.view([1, 1, 1, f, 1]) * distance.view([1, 1, t, 1, case.n_offsets])
        + phase.unsqueeze(-1); // (1, h, T, F, δ)
    let series = (amplitude.unsqueeze(-1) * angle.cos())
        .sum_dim_intlist(-2, false, None::<Kind>)
        .mean_dim(-1, false, None::<Kind>);
    let norm = ((&magnitude - &center_abs) * &k_abs).sum_dim_intlist(-1, false, None::<Kind>);
    let mut per_head = series + norm; // (1, h, T)
    if d > rotary {
        let (q_rest, k_rest) = (
            q.narrow(-1, rotary, d - rotary),
            k.narrow(-1, rotary, d - rotary),
        );
        let mean = q_rest.mean_dim(2, true, None::<Kind>);
        let spread = q_rest.abs().mean_dim(2, true, None::<Kind>) - mean.abs();
        per_head +=
            (&mean * &k_rest + &spread * k_rest.abs()).sum_dim_intlist(-1, false, None::<Kind>);
    }
    if case.normalize {
        let mean = per_head.mean_dim(-1, true, None::<Kind>);
        let std = per_head.std_correction(-1, 0, true);
        per_head = (per_head - mean) / std;
    }
    let grouped = per_head.view([1, hk, h / hk, t]);
    match case.aggregation {
        "max" => grouped.amax(2, false),
        _ => grouped.mean_dim(2, false, None::<Kind>),
    }
}

fn triattention(case: &TriAttentionCase) -> Box<dyn Scorer> {
    scorer(
        "triattention",
        &[
            ("n_offsets", ParamValue::Int(case.n_offsets)),
            ("normalize", ParamValue::Bool(case.normalize)),
            ("aggregation", ParamValue::Str(case.aggregation.to_string())),
        ],
    )
}

/// The RoPEs of the TriAttention checks: plain, linear and yarn scaling (yarn's attention
/// scaling s ≠ 1 must cancel: keys carry s, pre-RoPE statistics do not), and a partial
/// rotary whose last 8 channels do not rotate.
fn triattention_ropes() -> Vec<Rope> {
    let spec = |rope_type: &str, params: ScalingParams| RopeSpec {
        rope_type: rope_type.to_string(),
        params,
        ..RopeSpec::new(16, 1000.0)
    };
    let linear = ScalingParams {
        factor: Some(2.0),
        ..Default::default()
    };
    let yarn = ScalingParams {
        factor: Some(4.0),
        original_max_position_embeddings: Some(64),
        ..Default::default()
    };
    let partial = RopeSpec {
        partial_rotary_factor: 0.5,
        ..RopeSpec::new(16, 1000.0)
    };
    [
        spec("default", ScalingParams::default()),
        spec("linear", linear),
        spec("yarn", yarn),
        partial,
    ]
    .into_iter()
    .map(|s| Rope::new(s).unwrap())
    .collect()
}

#[test]
fn triattention_matches_the_series_over_distances() {
    let t = 40i64;
    let pre_q = randn(&[1, 6, t, 16], 100, Kind::Float) + 0.5;
    let pre_k = randn(&[1, 2, t, 16], 101, Kind::Float);
    let v = randn(&[1, 2, t, 16], 102, Kind::Float);
    let cases = [
        (5, true, "max"),
        (17, true, "max"),
        (5, true, "mean"),
        (5, false, "max"),
        (1, false, "mean"),
    ];
    for rope in triattention_ropes() {
        // without it the yarn case would not check that the scaling cancels
        assert!(rope.attention_scaling() > 1.0 || rope.rope_type() != "yarn");
        let q = rope.apply(&pre_q, &positions(t), Some(t as usize)).unwrap();
        let k = rope.apply(&pre_k, &positions(t), Some(t as usize)).unwrap();
        // the model's frequencies (tests/rope.rs checks them per rope type)
        let inv_freq = rope.inv_freq(Some(t as usize));
        for (n_offsets, normalize, aggregation) in cases {
            let case = TriAttentionCase {
                n_offsets,
                normalize,
                aggregation,
            };
            let ours = prefill_scores_with_rope(triattention(&case).as_ref(), &k, &v, &q, &rope);
            let want = ref_triattention(&pre_q, &pre_k, rope.rotary_dim() as i64, &inv_freq, &case);
            // float32 against a float64 series
            assert_close(&ours, &want, 1e-4, 1e-4);
        }
    }
}

#[test]
fn triattention_keeps_the_key_aligned_with_the_query_center() {
    // among tiny keys, one equal to the queries' pre-RoPE center and one opposite to it,
    // at neighbouring recent positions: the series (cos of the phase difference) must
    // rank the aligned key first — a check of the sign conventions
    let t = 40i64;
    let rope = Rope::new(RopeSpec::new(16, 1000.0)).unwrap();
    let base = randn(&[16], 110, Kind::Float);
    let pre_q = base.expand([1, 6, t, 16], false) + randn(&[1, 6, t, 16], 111, Kind::Float) * 0.01;
    let pre_k = randn(&[1, 2, t, 16], 112, Kind::Float) * 0.01;
    pre_k
        .narrow(2, 38, 1)
        .copy_(&base.expand([1, 2, 1, 16], false));
    pre_k
        .narrow(2, 39, 1)
        .copy_(&(-&base).expand([1, 2, 1, 16], false));
    let q = rope.apply(&pre_q, &positions(t), None).unwrap();
    let k = rope.apply(&pre_k, &positions(t), None).unwrap();
    for n_offsets in [1, 4] {
        let case = TriAttentionCase {
            n_offsets,
            normalize: true,
            aggregation: "max",
        };
        let ours = prefill_scores_with_rope(triattention(&case).as_ref(), &k, &k, &q, &rope);
        assert_eq!(kept_rows(&ours, 1), vec![vec![38], vec![38]]);
        // and the opposite key is ranked last
        assert_eq!(values_i64(&ours.argmin(-1, false)), vec![39, 39]);
    }
}

// ---------------------------------------------------------------------------------------
// All six
// ---------------------------------------------------------------------------------------

#[test]
fn query_scorers_refuse_to_score_without_queries() {
    // longer than SnapKV's default window of 64, so that only the missing queries fail
    let (_, k, v) = random_qkv(2, 3, 80, 16, 120, Kind::Float);
    let rope = Rope::new(RopeSpec::new(16, 1000.0)).unwrap();
    let ctx = ScoreContext::prefill(0, 20);
    for name in [
        "snapkv",
        "tova",
        "observed_attention",
        "cake",
        "expected_attention",
        "triattention",
    ] {
        let s = scorer_from_name(name, Params::new()).unwrap();
        let err = expect_err(
            score_layer(s.as_ref(), &k, &v, None, Some(&rope), &ctx),
            "InvalidArgument",
        );
        assert!(err.to_string().contains("queries"), "{name}: {err}");
    }
}
