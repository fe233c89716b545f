//! Scoring policies: Knorm, StreamingLLM and Random scores against independent references.

mod common;

use common::*;
use kvpress_rs::policies::{
    score, scorer_from_name, KeyValueScorer, Knorm, ParamValue, Params, Random, ScoreContext,
    Scorer, StreamingLlm,
};
use kvpress_rs::select::top_k_indices;
use tch::{Kind, Tensor};

fn ctx(layer_idx: usize, n_kept: usize) -> ScoreContext {
    ScoreContext::prefill(layer_idx, n_kept)
}

/// Asserts |got - want| <= rel * |want| elementwise (plus a tiny absolute floor).
#[track_caller]
fn assert_close(got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs() + 1e-30,
            "element {i}: got {g}, want {w}"
        );
    }
}

/// Knorm's expected scores: minus the f64 L2 norm of every key lane.
fn knorm_reference(keys: &Tensor) -> Vec<f64> {
    let d = *dims(keys).last().unwrap();
    norms_f64(&values_f64(keys), d).iter().map(|n| -n).collect()
}

#[test]
fn knorm_is_minus_the_l2_norm_f32() {
    for (seed, shape) in [(1, [2, 3, 17, 8]), (2, [1, 1, 5, 64]), (3, [3, 2, 9, 1])] {
        // Scale each token differently so that norms spread over several orders of magnitude.
        let mut rng = Rng::new(seed + 100);
        let scale: Vec<f64> = (0..shape[0] * shape[1] * shape[2])
            .map(|_| 10f64.powf(rng.uniform() * 4.0 - 2.0))
            .collect();
        let scale = tensor_f64(&scale, &[shape[0], shape[1], shape[2], 1], Kind::Float);
        let keys = randn(&shape, seed, Kind::Float) * scale;
        let values = randn(&shape, seed + 7, Kind::Float);
        let s = score(&Knorm, &keys, &values, &ctx(0, 1)).unwrap();
        assert_eq!(s.kind(), Kind::Float);
        assert_eq!(s.size(), &shape[..3]);
        assert_close(&values_f64(&s), &knorm_reference(&keys), 1e-5);
        // The libtorch path gives the same scores.
        let lt = Knorm.score_libtorch(&keys, &values, &ctx(0, 1)).unwrap();
        assert_close(&values_f64(&lt), &knorm_reference(&keys), 1e-5);
    }
}

#[test]
fn knorm_ignores_values() {
    let keys = randn(&[2, 2, 7, 4], 10, Kind::Float);
    let a = score(
        &Knorm,
        &keys,
        &randn(&[2, 2, 7, 4], 11, Kind::Float),
        &ctx(0, 1),
    )
    .unwrap();
    let b = score(
        &Knorm,
        &keys,
        &randn(&[2, 2, 7, 16], 12, Kind::Float),
        &ctx(5, 3),
    )
    .unwrap();
    assert!(a.equal(&b));
}

#[test]
fn knorm_on_non_contiguous_keys() {
    let bthd = randn(&[2, 11, 3, 8], 20, Kind::Float);
    let keys = bthd.transpose(1, 2);
    let values = keys.shallow_clone();
    assert_close(
        &values_f64(&score(&Knorm, &keys, &values, &ctx(0, 1)).unwrap()),
        &knorm_reference(&keys),
        1e-5,
    );
    // head_dim with stride t (the last axis is not contiguous).
    let keys = randn(&[2, 3, 8, 11], 21, Kind::Float).transpose(2, 3);
    let values = keys.shallow_clone();
    assert_close(
        &values_f64(&score(&Knorm, &keys, &values, &ctx(0, 1)).unwrap()),
        &knorm_reference(&keys),
        1e-5,
    );
    // Expanded over heads: every head scores like the shared one.
    let keys = randn(&[2, 1, 11, 8], 22, Kind::Float).expand([2, 4, 11, 8], false);
    let values = keys.shallow_clone();
    assert_close(
        &values_f64(&score(&Knorm, &keys, &values, &ctx(0, 1)).unwrap()),
        &knorm_reference(&keys),
        1e-5,
    );
}

#[test]
fn knorm_f16_is_the_norm_of_the_f16_values() {
    let keys = randn(&[2, 3, 13, 16], 30, Kind::Half);
    let s = score(&Knorm, &keys, &keys, &ctx(0, 1)).unwrap();
    assert_eq!(s.kind(), Kind::Float);
    assert_close(&values_f64(&s), &knorm_reference(&keys), 1e-5);
}

#[test]
fn knorm_bf16_is_computed_in_f32() {
    let keys = randn(&[2, 3, 29, 32], 40, Kind::BFloat16);
    let s = score(&Knorm, &keys, &keys, &ctx(0, 1)).unwrap();
    assert_eq!(s.kind(), Kind::Float);
    let want = knorm_reference(&keys);
    let got = values_f64(&s);
    assert_close(&got, &want, 1e-5);
    // A norm accumulated or rounded in bf16 (8 significant bits) would be off by ~1e-3
    // relative; the f32 scores are not bf16 numbers.
    let not_bf16 = got
        .iter()
        .filter(|&&v| half::bf16::from_f64(v).to_f64() != v)
        .count();
    assert!(
        not_bf16 > got.len() / 2,
        "only {not_bf16} of {} scores are off the bf16 grid",
        got.len()
    );
    let lt = Knorm.score_libtorch(&keys, &keys, &ctx(0, 1)).unwrap();
    assert_eq!(lt.kind(), Kind::Float);
    assert_close(&values_f64(&lt), &want, 1e-5);
}

/// The tokens StreamingLLM keeps, computed by hand: the first min(n_sink, n_kept) tokens
/// and the last n_kept - that many.
fn streaming_expected(t: usize, n_kept: usize, n_sink: usize) -> Vec<bool> {
    let n_kept = n_kept.min(t);
    let sinks = n_sink.min(n_kept);
    let recent = n_kept - sinks;
    (0..t).map(|i| i < sinks || i + recent >= t).collect()
}

#[test]
fn streaming_llm_keeps_sinks_and_recent_tokens() {
    let cases: [(usize, usize, usize, &[i64]); 10] = [
        (10, 4, 4, &[0, 1, 2, 3]),
        (10, 6, 4, &[0, 1, 2, 3, 8, 9]),
        (10, 2, 4, &[0, 1]),
        (10, 5, 0, &[5, 6, 7, 8, 9]),
        (16, 7, 1, &[0, 10, 11, 12, 13, 14, 15]),
        (1, 1, 4, &[0]),
        (6, 6, 3, &[0, 1, 2, 3, 4, 5]),
        (5, 9, 2, &[0, 1, 2, 3, 4]),
        (9, 1, 0, &[8]),
        (12, 5, 2, &[0, 1, 9, 10, 11]),
    ];
    for (t, n_kept, n_sink, kept) in cases {
        let keys = randn(&[2, 3, t as i64, 4], t as u64, Kind::Float);
        let scorer = StreamingLlm::new(n_sink as i64).unwrap();
        assert_eq!(scorer.n_sink(), n_sink);
        let s = score(&scorer, &keys, &keys, &ctx(3, n_kept)).unwrap();
        assert_eq!(dims(&s), [2, 3, t]);
        let v = values_f64(&s);
        let mask = streaming_expected(t, n_kept, n_sink);
        assert_eq!(
            mask.iter()
                .enumerate()
                .filter(|(_, &m)| m)
                .map(|(i, _)| i as i64)
                .collect::<Vec<_>>(),
            kept,
            "hand table vs mask"
        );
        // Scores do not depend on the budget: every kept token outscores every dropped one,
        // for this n_kept and for any other.
        for row in v.chunks(t) {
            let lowest_kept = mask
                .iter()
                .zip(row)
                .filter(|(&m, _)| m)
                .map(|(_, &x)| x)
                .fold(f64::INFINITY, f64::min);
            let highest_dropped = mask
                .iter()
                .zip(row)
                .filter(|(&m, _)| !m)
                .map(|(_, &x)| x)
                .fold(f64::NEG_INFINITY, f64::max);
            // (sinks tie with each other: with n_kept < n_sink the earlier ones win the tie)
            if n_kept >= n_sink {
                assert!(
                    lowest_kept > highest_dropped,
                    "t={t} n_kept={n_kept} n_sink={n_sink}"
                );
            } else {
                assert!(
                    lowest_kept >= highest_dropped,
                    "t={t} n_kept={n_kept} n_sink={n_sink}"
                );
            }
        }
        let other_budget = score(&scorer, &keys, &keys, &ctx(3, 1)).unwrap();
        assert!(other_budget.equal(&s));
        let k = n_kept.min(t);
        assert_eq!(values_i64(&top_k_indices(&s, k).unwrap()), kept.repeat(6));
        let lt = scorer
            .score_libtorch(&keys, &keys, &ctx(3, n_kept))
            .unwrap();
        assert_eq!(values_f64(&lt), v, "libtorch path");
    }
}

#[test]
fn streaming_llm_rejects_a_negative_sink_count() {
    expect_err(StreamingLlm::new(-1), "InvalidArgument");
    let params = Params::from_pairs([("n_sink".to_string(), ParamValue::Int(-3))]);
    expect_err(scorer_from_name("streaming_llm", params), "InvalidArgument");
}

#[test]
fn random_scores_are_seeded_uniforms() {
    let keys = randn(&[2, 4, 64, 8], 50, Kind::Float);
    let a = score(&Random::new(7), &keys, &keys, &ctx(0, 10)).unwrap();
    assert_eq!(a.kind(), Kind::Float);
    assert_eq!(dims(&a), [2, 4, 64]);
    let va = values_f64(&a);
    assert!(
        va.iter().all(|&x| (0.0..1.0).contains(&x)),
        "values in [0, 1)"
    );
    let mean = va.iter().sum::<f64>() / va.len() as f64;
    assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    let mut sorted = va.clone();
    sorted.sort_by(|x, y| x.partial_cmp(y).unwrap());
    sorted.dedup();
    assert!(sorted.len() > va.len() - 3, "scores should hardly ever tie");

    // Same seed, separate instance, other keys and n_kept: same scores.
    let other_keys = randn(&[2, 4, 64, 8], 51, Kind::Float);
    let b = score(&Random::new(7), &other_keys, &other_keys, &ctx(0, 33)).unwrap();
    assert!(a.equal(&b));
    // Other seed or other layer: different scores.
    let c = score(&Random::new(8), &keys, &keys, &ctx(0, 10)).unwrap();
    let d = score(&Random::new(7), &keys, &keys, &ctx(1, 10)).unwrap();
    for other in [&c, &d] {
        let vo = values_f64(other);
        let same = va.iter().zip(&vo).filter(|(x, y)| x == y).count();
        assert!(same < 3, "{same} equal scores");
    }
    // Rows differ from each other (batch and head are part of the counter).
    assert_ne!(va[..64], va[64..128]);
    assert_ne!(va[..64], va[4 * 64..5 * 64]);
    // The libtorch path gives bit-identical scores.
    let lt = Random::new(7)
        .score_libtorch(&keys, &keys, &ctx(0, 10))
        .unwrap();
    assert!(lt.equal(&a));
}

#[test]
fn random_score_of_a_token_does_not_depend_on_the_sequence_length() {
    let long = randn(&[1, 2, 40, 4], 60, Kind::Float);
    let short = long.narrow(2, 0, 25);
    let s_long = score(&Random::new(3), &long, &long, &ctx(2, 5)).unwrap();
    let s_short = score(&Random::new(3), &short, &short, &ctx(2, 5)).unwrap();
    assert!(s_long.narrow(2, 0, 25).equal(&s_short));
}

#[test]
fn scorer_from_name_builds_each_policy() {
    for name in kvpress_rs::policies::policy_names() {
        assert_eq!(scorer_from_name(name, Params::new()).unwrap().name(), name);
    }
    for alias in ["streamingllm", "streaming"] {
        assert_eq!(
            scorer_from_name(alias, Params::new()).unwrap().name(),
            "streaming_llm"
        );
    }
    // The parameters reach the scorers.
    let keys = randn(&[1, 1, 10, 4], 70, Kind::Float);
    let n_sink = Params::from_pairs([("n_sink".to_string(), ParamValue::Int(2))]);
    let streaming = scorer_from_name("streaming_llm", n_sink).unwrap();
    let s = score(streaming.as_ref(), &keys, &keys, &ctx(0, 4)).unwrap();
    assert_eq!(values_i64(&top_k_indices(&s, 4).unwrap()), [0, 1, 8, 9]);
    let seed = Params::from_pairs([("seed".to_string(), ParamValue::Int(9))]);
    let random = scorer_from_name("random", seed).unwrap();
    let r = score(random.as_ref(), &keys, &keys, &ctx(0, 4)).unwrap();
    assert!(r.equal(&score(&Random::new(9), &keys, &keys, &ctx(0, 4)).unwrap()));
    // A parameter the policy does not take is an error naming it.
    let stray = Params::from_pairs([("seed".to_string(), ParamValue::Int(9))]);
    let e = expect_err(scorer_from_name("knorm", stray), "InvalidArgument");
    assert!(e.to_string().contains("seed"), "{e}");

    for unknown in ["", "snap-kv", "knorm ", "k-norm"] {
        let e = expect_err(scorer_from_name(unknown, Params::new()), "InvalidArgument");
        assert!(
            matches!(&e, kvpress_rs::KvError::InvalidArgument { argument, .. } if argument == "policy"),
            "{e}"
        );
    }
}

#[test]
fn score_rejects_malformed_keys_and_values() {
    let keys = randn(&[2, 3, 8, 4], 80, Kind::Float);
    for scorer in [
        &Knorm as &dyn Scorer,
        &StreamingLlm::new(1).unwrap(),
        &Random::new(0),
    ] {
        let c = ctx(0, 2);
        expect_err(
            score(scorer, &keys.narrow(2, 0, 0), &keys.narrow(2, 0, 0), &c),
            "Empty",
        );
        expect_err(
            score(scorer, &keys.select(3, 0), &keys.select(3, 0), &c),
            "Shape",
        );
        expect_err(score(scorer, &keys, &keys.narrow(2, 0, 7), &c), "Shape");
        expect_err(score(scorer, &keys, &keys.narrow(1, 0, 2), &c), "Shape");
        expect_err(score(scorer, &keys, &keys.to_kind(Kind::Half), &c), "Dtype");
        expect_err(
            score(
                scorer,
                &keys.to_kind(Kind::Double),
                &keys.to_kind(Kind::Double),
                &c,
            ),
            "Dtype",
        );
        let ints = Tensor::zeros([2, 3, 8, 4], (Kind::Int, CPU));
        expect_err(score(scorer, &ints, &ints, &c), "Dtype");
    }
}
