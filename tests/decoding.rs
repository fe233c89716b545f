//! Decoding-time compression in the core: the schedule's arithmetic, `Press::compress_to`
//! with protected ends, and scorers over the queries of the last tokens only.

mod common;

use common::*;
use kvpress_rs::decoding::DecodingSchedule;
use kvpress_rs::policies::{
    query_stats, scorer_from_name, Knorm, Params, ScoreContext, ScoreInput,
};
use kvpress_rs::rope::{Rope, RopeSpec};
use kvpress_rs::{Budget, KvError, LayerStore, Press};
use tch::{Device, Kind, Tensor};

fn schedule(budget: i64, interval: i64, protect: bool) -> DecodingSchedule {
    DecodingSchedule::from_args(Some(budget), None, Some(interval), protect).unwrap()
}

#[test]
fn schedule_compresses_every_interval_back_to_the_budget() {
    let s = schedule(100, 16, false);
    // decoding: grows from 100 to 116 between compressions
    let mut stored = 100;
    let mut compressions = 0;
    for seen in 101..=1000 {
        stored += 1;
        assert!(stored <= 116);
        if let Some(n) = s.plan(stored, seen, 1, 0).unwrap() {
            assert_eq!((n, stored), (100, 116));
            stored = n;
            compressions += 1;
        }
    }
    assert_eq!(compressions, 900 / 16);
    // a prompt block compresses as soon as it is over the budget
    assert_eq!(s.plan(101, 101, 40, 0).unwrap(), Some(100));
    assert_eq!(s.plan(100, 100, 40, 0).unwrap(), None);
}

#[test]
fn ratio_schedule_follows_the_tokens_seen_but_keeps_the_protected_ones() {
    let s = DecodingSchedule::from_args(None, Some(0.25), Some(8), true).unwrap();
    assert_eq!(s.plan(400, 400, 1, 0).unwrap(), Some(100));
    // 20 protected prompt tokens + 8 recent exceed int(40 * 0.25) = 10: keep 28
    assert_eq!(s.plan(40, 40, 1, 20).unwrap(), Some(28));
}

#[test]
fn bad_schedules_name_their_argument() {
    let arg = |r: Result<DecodingSchedule, KvError>| match r {
        Err(KvError::InvalidArgument { argument, .. }) => argument,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    assert_eq!(
        arg(DecodingSchedule::from_args(Some(0), None, None, false)),
        "decoding_budget"
    );
    assert_eq!(
        arg(DecodingSchedule::from_args(Some(200), None, Some(0), false)),
        "decoding_interval"
    );
    assert_eq!(
        arg(DecodingSchedule::from_args(None, Some(0.0), None, false)),
        "decoding_ratio"
    );
    assert_eq!(
        arg(DecodingSchedule::from_args(None, None, None, false)),
        "decoding_budget"
    );
    assert_eq!(
        arg(DecodingSchedule::from_args(Some(64), None, None, false)),
        "decoding_budget"
    );
    // a token budget below the protected prompt + interval
    let s = schedule(40, 16, true);
    match s.plan(60, 60, 1, 30) {
        Err(KvError::InvalidArgument { argument, .. }) => assert_eq!(argument, "decoding_budget"),
        other => panic!("{other:?}"),
    }
}

/// Keys whose norm is the token index + 1: Knorm (keep the smallest norms) keeps the
/// earliest tokens, so protection of the last ones is visible.
fn growing_keys(t: i64) -> Tensor {
    let norms = Tensor::arange(t, (Kind::Float, Device::Cpu))
        .f_add_scalar(1.0)
        .unwrap();
    Tensor::ones([1, 2, t, 4], (Kind::Float, Device::Cpu)) * norms.view([1, 1, t, 1]) / 2.0
}

#[test]
fn compress_to_keeps_the_protected_ends_and_the_best_of_the_rest() {
    let press = Press::new(Box::new(Knorm), Budget::ratio(0.0).unwrap());
    let keys = growing_keys(20);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &keys).unwrap();
    press
        .compress_to(&mut store, 0, None, None, 10, 20, (2, 4), false)
        .unwrap();
    assert_eq!((store.len(), store.seen()), (10, 20));
    let kept = store.kept_positions().unwrap().into_uniform().unwrap();
    // 0, 1 protected (and smallest anyway), then the smallest norms 2..5, then 16..19
    let expected: Vec<i64> = vec![0, 1, 2, 3, 4, 5, 16, 17, 18, 19];
    for h in 0..2 {
        assert_eq!(Vec::<i64>::try_from(kept.get(0).get(h)).unwrap(), expected);
    }
    // a second compression: positions are those of the tokens seen, not of the store
    let more = growing_keys(6) * 100.0;
    let _ = store.append(&more, &more).unwrap();
    press
        .compress_to(&mut store, 0, None, None, 8, 26, (0, 3), false)
        .unwrap();
    let kept = store.kept_positions().unwrap().into_uniform().unwrap();
    assert_eq!(
        Vec::<i64>::try_from(kept.get(0).get(0)).unwrap(),
        vec![0, 1, 2, 3, 4, 23, 24, 25]
    );
    // fewer than the protected tokens: an error naming the budget
    match press.compress_to(&mut store, 0, None, None, 2, 26, (0, 3), false) {
        Err(KvError::InvalidArgument { argument, .. }) => assert_eq!(argument, "decoding_budget"),
        other => panic!("{other:?}"),
    }
}

/// H2O over the queries of the last q tokens: attention received from those queries,
/// divided by how many of them could see the token — an f64 reference.
#[test]
fn observed_attention_over_the_last_queries_matches_a_reference() {
    let (t, q, d) = (12i64, 5i64, 8i64);
    let keys = randn(&[1, 1, t, d], 7, Kind::Float);
    let queries = randn(&[1, 2, q, d], 8, Kind::Float);
    let scorer = scorer_from_name("observed_attention", Params::new()).unwrap();
    let input = ScoreInput {
        keys: &keys,
        values: &keys,
        queries: Some(&queries),
        rope: None,
        query_stats: None,
        ctx: ScoreContext {
            layer_idx: 0,
            n_kept: 4,
            next_position: Some(40),
        },
    };
    let scores = Vec::<f64>::try_from(
        scorer
            .score(&input)
            .unwrap()
            .to_kind(Kind::Double)
            .flatten(0, -1),
    )
    .unwrap();
    let k = Vec::<f64>::try_from(keys.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let qv = Vec::<f64>::try_from(queries.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    let mut expected = vec![0f64; t as usize];
    for h in 0..2usize {
        for i in 0..q as usize {
            let row = (t - q) as usize + i; // the query's own stored index
            let logits: Vec<f64> = (0..=row)
                .map(|j| {
                    (0..d as usize)
                        .map(|c| qv[(h * q as usize + i) * d as usize + c] * k[j * d as usize + c])
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for (j, l) in logits.iter().enumerate() {
                let observers = (q as usize).min(t as usize - j) as f64;
                expected[j] += (l - max).exp() / z / observers / 2.0;
            }
        }
    }
    for (a, b) in scores.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-5, "{scores:?} vs {expected:?}");
    }
}

/// TriAttention during generation: the queries of the last q tokens are inverse-rotated at
/// positions t0 − q .. t0 (t0 = tokens seen), which equals scoring with the statistics of
/// those pre-RoPE queries.
#[test]
fn triattention_decode_queries_sit_just_before_the_next_position() {
    let rope = Rope::new(RopeSpec::new(8, 10000.0)).unwrap();
    let (q, t0) = (6i64, 50usize);
    let pre = randn(&[1, 2, q, 8], 3, Kind::Float);
    let positions = Tensor::arange_start((t0 as i64) - q, t0 as i64, (Kind::Int64, Device::Cpu));
    let post = rope.apply(&pre, &positions, None).unwrap();
    let keys = randn(&[1, 1, 20, 8], 4, Kind::Float);
    let scorer = scorer_from_name("triattention", Params::new()).unwrap();
    let ctx = ScoreContext {
        layer_idx: 0,
        n_kept: 10,
        next_position: Some(t0),
    };
    let from_queries = scorer
        .score(&ScoreInput {
            keys: &keys,
            values: &keys,
            queries: Some(&post),
            rope: Some(&rope),
            query_stats: None,
            ctx,
        })
        .unwrap();
    let stats = query_stats(&post, &rope, t0 - q as usize).unwrap();
    let from_stats = scorer
        .score(&ScoreInput {
            keys: &keys,
            values: &keys,
            queries: None,
            rope: Some(&rope),
            query_stats: Some(&stats),
            ctx,
        })
        .unwrap();
    assert!(from_queries.allclose(&from_stats, 1e-6, 1e-6, false));
    // the statistics are those of the pre-RoPE queries
    let center = pre.narrow(-1, 0, 4).mean_dim(2, false, Kind::Float);
    assert!(stats.center_re.allclose(&center, 1e-5, 1e-5, false));
    // merged statistics weight by count
    let half = query_stats(&post.narrow(2, 0, 2), &rope, t0 - q as usize).unwrap();
    let rest = query_stats(&post.narrow(2, 2, 4), &rope, t0 - q as usize + 2).unwrap();
    let merged = half.merge(&rest).unwrap();
    assert_eq!(merged.count, 6);
    assert!(merged
        .center_re
        .allclose(&stats.center_re, 1e-5, 1e-5, false));
    assert!(merged
        .magnitude
        .allclose(&stats.magnitude, 1e-5, 1e-5, false));
}
