//! Decoding-time compression in the core: the schedule's arithmetic, `Press::compress_to`
//! with protected ends, and scorers over the queries of the last tokens only.

mod common;

use common::*;
use kvpress_rs::decoding::DecodingSchedule;
use kvpress_rs::policies::{
    query_stats, scorer_from_name, Knorm, ParamValue, Params, ScoreContext, ScoreInput, Scorer,
    SnapKv,
};
use kvpress_rs::press::{Decoding, Plan};
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

fn step(n_kept: usize, next_position: usize, protect: (usize, usize)) -> Plan {
    Plan::decoding(
        0,
        Decoding {
            n_kept,
            next_position,
            protect_first: protect.0,
            protect_last: protect.1,
        },
    )
}

#[test]
fn compress_to_keeps_the_protected_ends_and_the_best_of_the_rest() {
    let press = Press::new(Box::new(Knorm), Budget::ratio(0.0).unwrap());
    let keys = growing_keys(20);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &keys).unwrap();
    press.compress(&mut store, step(10, 20, (2, 4))).unwrap();
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
    press.compress(&mut store, step(8, 26, (0, 3))).unwrap();
    let kept = store.kept_positions().unwrap().into_uniform().unwrap();
    assert_eq!(
        Vec::<i64>::try_from(kept.get(0).get(0)).unwrap(),
        vec![0, 1, 2, 3, 4, 23, 24, 25]
    );
    // fewer than the protected tokens: an error naming the budget
    match press.compress(&mut store, step(2, 26, (0, 3))) {
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
        previous_scores: None,
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
            previous_scores: None,
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
            previous_scores: None,
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

/// SnapKV's pooling over the previous ranking, by hand: each row's order is the first m
/// tokens by decreasing previous score (ties, and −inf, in position order) then tokens
/// m..n; the kernel-k mean over that order (zero padding counted, as SnapKV's position
/// pooling) goes back to each token. `raw` are the unpooled scores of the n tokens.
fn reference_rank_pooling(raw: &[f64], previous: &[f64], n: usize, m: usize, k: usize) -> Vec<f64> {
    let rows = raw.len() / n;
    let mut out = vec![0.0; raw.len()];
    for r in 0..rows {
        let prev = &previous[r * m..(r + 1) * m];
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|&a, &b| prev[b].partial_cmp(&prev[a]).unwrap().then(a.cmp(&b)));
        order.extend(m..n);
        let ranked: Vec<f64> = order.iter().map(|&i| raw[r * n + i]).collect();
        for (j, &token) in order.iter().enumerate() {
            let lo = j.saturating_sub(k / 2);
            let hi = (j + k / 2).min(n - 1);
            out[r * n + token] = ranked[lo..=hi].iter().sum::<f64>() / k as f64;
        }
    }
    out
}

fn snapkv_input<'a>(
    keys: &'a Tensor,
    queries: &'a Tensor,
    previous_scores: Option<&'a Tensor>,
) -> ScoreInput<'a> {
    ScoreInput {
        keys,
        values: keys,
        queries: Some(queries),
        rope: None,
        query_stats: None,
        previous_scores,
        ctx: ScoreContext {
            layer_idx: 0,
            n_kept: 8,
            next_position: Some(500),
        },
    }
}

#[test]
fn snapkv_rank_pooling_matches_a_reference() {
    let (b, h, t, d, w, m) = (2i64, 2i64, 30i64, 8i64, 4usize, 20usize);
    let n = t as usize - w;
    let keys = randn(&[b, h, t, d], 21, Kind::Float);
    let queries = randn(&[b, 2 * h, w as i64, d], 22, Kind::Float);
    // previous scores with ties and never-ranked (−inf) tokens among the first m
    let mut rng = Rng::new(23);
    let mut previous: Vec<f64> = (0..(b * h) as usize * m).map(|_| rng.uniform()).collect();
    for row in previous.chunks_mut(m) {
        row[3] = row[7];
        row[m - 2] = f64::NEG_INFINITY;
        row[m - 1] = f64::NEG_INFINITY;
    }
    let prev = tensor_f64(&previous, &[b, h, m as i64], Kind::Float);
    let unpooled = SnapKv::new(w, 1)
        .unwrap()
        .score(&snapkv_input(&keys, &queries, None))
        .unwrap();
    let raw = values_f64(&unpooled.narrow(2, 0, n as i64));
    let expected = reference_rank_pooling(&raw, &values_f64(&prev), n, m, 7);

    let rank = SnapKv::with_decoding_pooling(w, 5, "rank", 7).unwrap();
    assert!(rank.remembers_scores());
    let got = rank
        .score(&snapkv_input(&keys, &queries, Some(&prev)))
        .unwrap();
    assert_eq!(dims(&got), [2, 2, 30]);
    let got_values = values_f64(&got);
    for (r, row) in got_values.chunks(t as usize).enumerate() {
        for i in 0..n {
            let e = expected[r * n + i];
            assert!(
                (row[i] - e).abs() < 1e-6,
                "row {r} token {i}: {} vs {e}",
                row[i]
            );
        }
        // the window is still kept first
        let top = row[..n].iter().cloned().fold(f64::MIN, f64::max);
        assert!(row[n..].iter().all(|&x| x > top));
    }
    // no previous ranking (the first decoding compression): pooled over positions
    let first = values_f64(&rank.score(&snapkv_input(&keys, &queries, None)).unwrap());
    let by_position = reference_rank_pooling(&raw, &[], n, 0, 7);
    for (r, row) in first.chunks(t as usize).enumerate() {
        for i in 0..n {
            assert!((row[i] - by_position[r * n + i]).abs() < 1e-6);
        }
    }
    // a prompt's compression (no tokens-seen context) is SnapKV's kernel_size pooling
    let mut prefill = snapkv_input(&keys, &queries, Some(&prev));
    prefill.ctx.next_position = None;
    let plain = SnapKv::new(w, 5).unwrap().score(&prefill).unwrap();
    assert_eq!(
        values_f64(&rank.score(&prefill).unwrap()),
        values_f64(&plain)
    );
    // "position" never remembers, and pools decoding compressions by position too
    let position = SnapKv::with_decoding_pooling(w, 5, "position", 7).unwrap();
    assert!(!position.remembers_scores());
    let ignored = position
        .score(&snapkv_input(&keys, &queries, Some(&prev)))
        .unwrap();
    assert_eq!(values_f64(&ignored), values_f64(&plain));
    let e = expect_err(
        SnapKv::with_decoding_pooling(w, 5, "ranked", 7),
        "InvalidArgument",
    );
    assert!(e.to_string().contains("decoding_pooling"), "{e}");
    let e = expect_err(
        SnapKv::with_decoding_pooling(w, 5, "rank", 4),
        "InvalidArgument",
    );
    assert!(e.to_string().contains("decoding_kernel_size"), "{e}");
}

/// Two decoding compressions of a SnapKV store: the first returns the kept tokens' scores
/// (−inf for the window), the second pools over that ranking; the kept tokens are those of
/// a reference built from the unpooled scores.
#[test]
fn snapkv_decoding_compressions_remember_the_ranking() {
    let (b, h, d, w) = (1i64, 2i64, 8i64, 4usize);
    let mut params = Params::new();
    params.insert("window_size", ParamValue::Int(4));
    let press = Press::new(
        scorer_from_name("snapkv", params).unwrap(),
        Budget::ratio(0.0).unwrap(),
    );
    assert!(press.scorer().remembers_scores());
    let mut store = LayerStore::new();
    let _ = store
        .append(
            &randn(&[b, h, 40, d], 31, Kind::Float),
            &randn(&[b, h, 40, d], 32, Kind::Float),
        )
        .unwrap();
    let q1 = randn(&[b, 2 * h, w as i64, d], 33, Kind::Float);
    let step = |n_kept, next_position, queries, previous_scores| {
        Plan::decoding(
            0,
            Decoding {
                n_kept,
                next_position,
                protect_first: 0,
                protect_last: 8,
            },
        )
        .with_queries(queries)
        .with_previous_scores(previous_scores)
    };
    let scores1 = press
        .scorer()
        .score(&snapkv_input(&store.keys_view().unwrap(), &q1, None))
        .unwrap();
    let first = press
        .compress(&mut store, step(24, 40, Some(&q1), None))
        .unwrap();
    assert!(first.evicted);
    let kept_scores = first.kept_scores.expect("snapkv remembers");
    assert_eq!(dims(&kept_scores), [1, 2, 24]);
    let kept1 = values_i64(&store.kept_positions().unwrap().into_uniform().unwrap());
    let (all1, remembered) = (values_f64(&scores1), values_f64(&kept_scores));
    for (i, (&pos, &s)) in kept1.iter().zip(&remembered).enumerate() {
        let row = i / 24;
        if pos >= 36 {
            assert_eq!(s, f64::NEG_INFINITY, "window token {pos}");
        } else {
            assert!(
                (s - all1[row * 40 + pos as usize]).abs() < 1e-6,
                "{pos}: {s} vs {}",
                all1[row * 40 + pos as usize]
            );
        }
    }

    // 12 more tokens, then a compression that pools over the first one's ranking
    let _ = store
        .append(
            &randn(&[b, h, 12, d], 34, Kind::Float),
            &randn(&[b, h, 12, d], 35, Kind::Float),
        )
        .unwrap();
    let q2 = randn(&[b, 2 * h, w as i64, d], 36, Kind::Float);
    let (keys2, values2) = (store.keys_view().unwrap(), store.values_view().unwrap());
    let unpooled = SnapKv::new(w, 1)
        .unwrap()
        .score(&snapkv_input(&keys2, &q2, None))
        .unwrap();
    let (n, t) = (36usize - w, 36usize);
    let raw: Vec<f64> = values_f64(&unpooled)
        .chunks(t)
        .flat_map(|row| row[..n].to_vec())
        .collect();
    let mut expected_scores = reference_rank_pooling(&raw, &remembered, n, 24, 7);
    // the last 8 stored tokens are protected (the window among them)
    let mut full = vec![];
    for row in expected_scores.chunks_mut(n) {
        full.extend(
            row.iter()
                .enumerate()
                .map(|(i, &s)| if i >= t - 8 { f64::INFINITY } else { s }),
        );
        full.extend(std::iter::repeat_n(f64::INFINITY, w));
    }
    let expected_idx = reference_top_k_rows(&full, t, 24);
    let second = press
        .compress(&mut store, step(24, 52, Some(&q2), Some(&kept_scores)))
        .unwrap();
    assert!(second.evicted && second.kept_scores.is_some());
    let kept2 = values_i64(&store.kept_positions().unwrap().into_uniform().unwrap());
    let expected_pos: Vec<i64> = expected_idx
        .iter()
        .enumerate()
        .map(|(i, &j)| {
            let row = i / 24;
            let j = j as usize;
            if j < 24 {
                kept1[row * 24 + j]
            } else {
                40 + (j - 24) as i64
            }
        })
        .collect();
    assert_eq!(kept2, expected_pos);
    // pooled by position instead, the same compression keeps other tokens
    let mut twin = LayerStore::new();
    let _ = twin.append(&keys2, &values2).unwrap();
    let _ = press
        .compress(&mut twin, step(24, 36, Some(&q2), None))
        .unwrap();
    let by_position = values_i64(&twin.kept_positions().unwrap().into_uniform().unwrap());
    assert_ne!(by_position, expected_idx);
}

#[test]
fn previous_scores_of_the_wrong_shape_are_refused() {
    let press = Press::new(
        scorer_from_name("snapkv", Params::new()).unwrap(),
        Budget::ratio(0.0).unwrap(),
    );
    let mut store = LayerStore::new();
    let keys = randn(&[1, 2, 200, 8], 41, Kind::Float);
    let _ = store.append(&keys, &keys).unwrap();
    let queries = randn(&[1, 4, 64, 8], 42, Kind::Float);
    for (bad, expected) in [
        (
            Tensor::zeros([1, 3, 100], (Kind::Float, Device::Cpu)),
            "Shape",
        ),
        (
            Tensor::zeros([1, 2, 201], (Kind::Float, Device::Cpu)),
            "Shape",
        ),
        (
            Tensor::zeros([1, 2, 100], (Kind::Int64, Device::Cpu)),
            "Dtype",
        ),
    ] {
        let step = Plan::decoding(
            0,
            Decoding {
                n_kept: 150,
                next_position: 200,
                protect_first: 0,
                protect_last: 64,
            },
        )
        .with_queries(Some(&queries))
        .with_previous_scores(Some(&bad));
        let e = expect_err(press.compress(&mut store, step), expected);
        assert!(e.to_string().contains("previous_scores"), "{e}");
        assert_eq!(store.len(), 200, "nothing evicted");
    }
}
