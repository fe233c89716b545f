//! Press::compress on a LayerStore: kept tokens, positions and bytes against a reference.

mod common;

use common::*;
use kvpress_rs::policies::{Knorm, Random, StreamingLlm};
use kvpress_rs::press::Plan;
use kvpress_rs::{Budget, LayerStore, Press};
use tch::{Kind, Tensor};

/// Keys whose token norms spread over two orders of magnitude, so that f32/f16/bf16 norms
/// rank tokens exactly like the f64 reference.
fn spread_keys(shape: [i64; 4], seed: u64, kind: Kind) -> Tensor {
    let mut rng = Rng::new(seed ^ 0xABCD);
    let n = (shape[0] * shape[1] * shape[2]) as usize;
    let scale: Vec<f64> = (0..n)
        .map(|_| 10f64.powf(rng.uniform() * 2.0 - 1.0))
        .collect();
    let scale = tensor_f64(&scale, &[shape[0], shape[1], shape[2], 1], Kind::Double);
    (randn(&shape, seed, Kind::Double) * scale).to_kind(kind)
}

/// Knorm's kept indices for flattened (b, h, t, d) keys: the `k` smallest f64 norms per
/// row, ascending. Also checks that the k-th and (k+1)-th norms are well apart, so that
/// the reference cannot differ from a correct lower-precision ranking.
fn knorm_reference(keys: &[f64], t: usize, d: usize, k: usize) -> Vec<i64> {
    let neg: Vec<f64> = norms_f64(keys, d).iter().map(|n| -n).collect();
    for row in neg.chunks(t) {
        if k < t {
            let mut sorted: Vec<f64> = row.iter().map(|x| -x).collect();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            assert!(
                sorted[k] - sorted[k - 1] > 1e-3 * sorted[k],
                "test data: norms too close at the cut"
            );
        }
    }
    reference_top_k_rows(&neg, t, k)
}

fn exact_bytes(
    b: usize,
    h: usize,
    n: usize,
    dk: usize,
    dv: usize,
    elt: usize,
    with_positions: bool,
) -> usize {
    b * h * n * (dk + dv) * elt + if with_positions { b * h * n * 4 } else { 0 }
}

fn check_knorm_compress(kind: Kind, elt: usize) {
    let (b, h, t, dk, dv) = (2usize, 3usize, 24usize, 8usize, 6usize);
    let keys = spread_keys([b as i64, h as i64, t as i64, dk as i64], 1, kind);
    let values = randn(&[b as i64, h as i64, t as i64, dv as i64], 2, kind);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &values).unwrap();

    // ratio 0.375: int(24 * 0.625) = 15 tokens kept.
    let press = Press::new(Box::new(Knorm), Budget::ratio(0.375).unwrap());
    press.compress(&mut store, Plan::prefill(0)).unwrap();
    let n_kept = 15;
    assert_eq!((store.len(), store.seen()), (n_kept, t));
    assert!(store.has_evicted());

    let kv = values_f64(&keys);
    let idx = knorm_reference(&kv, t, dk, n_kept);
    let kept_keys = store.keys_view().unwrap();
    let kept_values = store.values_view().unwrap();
    assert_eq!(kept_keys.kind(), kind);
    assert_eq!(dims(&kept_keys), [b, h, n_kept, dk]);
    assert_eq!(dims(&kept_values), [b, h, n_kept, dv]);
    assert_eq!(
        values_f64(&kept_keys),
        reference_gather(&kv, (b, h, t, dk), &idx, n_kept)
    );
    assert_eq!(
        values_f64(&kept_values),
        reference_gather(&values_f64(&values), (b, h, t, dv), &idx, n_kept)
    );

    let positions = store.kept_positions().unwrap().into_uniform().unwrap();
    assert_eq!(positions.kind(), Kind::Int64);
    assert_eq!(dims(&positions), [b, h, n_kept]);
    assert_eq!(values_i64(&positions), idx);
    // Different heads keep different tokens (the test would be weak otherwise).
    assert_ne!(idx[..n_kept], idx[n_kept..2 * n_kept]);

    assert_eq!(store.nbytes(), exact_bytes(b, h, n_kept, dk, dv, elt, true));
    let stats = store.stats();
    assert_eq!(
        (stats.seen, stats.stored, stats.nbytes),
        (t, n_kept, store.nbytes())
    );
}

#[test]
fn knorm_compress_f32_keeps_the_smallest_norm_keys() {
    check_knorm_compress(Kind::Float, 4);
}

#[test]
fn knorm_compress_f16_keeps_the_smallest_norm_keys() {
    check_knorm_compress(Kind::Half, 2);
}

#[test]
fn knorm_compress_bf16_keeps_the_smallest_norm_keys() {
    check_knorm_compress(Kind::BFloat16, 2);
}

#[test]
fn knorm_compress_of_a_transposed_prompt() {
    // Keys laid out (b, t, h, d) by the model, appended as the (b, h, t, d) transpose.
    let (b, h, t, d) = (2usize, 2usize, 20usize, 4usize);
    let keys =
        spread_keys([b as i64, t as i64, h as i64, d as i64], 3, Kind::Float).transpose(1, 2);
    let values = randn(&[b as i64, t as i64, h as i64, d as i64], 4, Kind::Float).transpose(1, 2);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &values).unwrap();
    Press::new(Box::new(Knorm), Budget::max_tokens(7).unwrap())
        .compress(&mut store, Plan::prefill(0))
        .unwrap();
    let idx = knorm_reference(&values_f64(&keys), t, d, 7);
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        idx
    );
    assert_eq!(
        values_f64(&store.keys_view().unwrap()),
        reference_gather(&values_f64(&keys), (b, h, t, d), &idx, 7)
    );
    assert_eq!(
        values_f64(&store.values_view().unwrap()),
        reference_gather(&values_f64(&values), (b, h, t, d), &idx, 7)
    );
}

#[test]
fn a_budget_that_keeps_everything_leaves_the_storage_untouched() {
    let (b, h, t, d) = (2usize, 3usize, 12usize, 8usize);
    for budget in [
        Budget::ratio(0.0).unwrap(),
        Budget::max_tokens(12).unwrap(),
        Budget::max_tokens(50).unwrap(),
    ] {
        let keys = randn(&[b as i64, h as i64, t as i64, d as i64], 10, Kind::Float);
        let values = randn(&[b as i64, h as i64, t as i64, d as i64], 11, Kind::Float);
        let mut store = LayerStore::new();
        let _ = store.append(&keys, &values).unwrap();
        Press::new(Box::new(Knorm), budget)
            .compress(&mut store, Plan::prefill(0))
            .unwrap();
        assert_eq!((store.len(), store.seen()), (t, t));
        assert!(!store.has_evicted());
        assert_eq!(
            store.keys_view().unwrap().data_ptr(),
            keys.data_ptr(),
            "{budget:?}"
        );
        assert_eq!(
            store.values_view().unwrap().data_ptr(),
            values.data_ptr(),
            "{budget:?}"
        );
        assert_eq!(store.nbytes(), exact_bytes(b, h, t, d, d, 4, false));
        let all: Vec<i64> = (0..t as i64).collect();
        assert_eq!(
            values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
            all.repeat(b * h)
        );
    }
}

#[test]
fn decoding_after_compression_appends_at_the_seen_position() {
    let (b, h, t, d) = (2usize, 2usize, 16usize, 4usize);
    let keys = spread_keys([b as i64, h as i64, t as i64, d as i64], 20, Kind::Float);
    let values = randn(&[b as i64, h as i64, t as i64, d as i64], 21, Kind::Float);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &values).unwrap();
    Press::new(Box::new(Knorm), Budget::ratio(0.5).unwrap())
        .compress(&mut store, Plan::prefill(0))
        .unwrap();
    let compressed_keys = values_f64(&store.keys_view().unwrap());
    let compressed_values = values_f64(&store.values_view().unwrap());
    let mut positions = values_i64(&store.kept_positions().unwrap().into_uniform().unwrap());
    let mut len = 8;

    for step in 0..5 {
        let k_new = randn(&[b as i64, h as i64, 1, d as i64], 100 + step, Kind::Float);
        let v_new = randn(&[b as i64, h as i64, 1, d as i64], 200 + step, Kind::Float);
        let seen_before = store.seen();
        let (k_all, v_all) = store.append(&k_new, &v_new).unwrap();
        len += 1;
        assert_eq!((store.seen(), store.len()), (seen_before + 1, len));
        assert_eq!(dims(&k_all), [b, h, len, d]);
        assert_eq!(dims(&v_all), [b, h, len, d]);
        // The returned tensors end with the new token; the compressed prefix is untouched.
        assert_eq!(
            values_f64(&k_all.narrow(2, len as i64 - 1, 1)),
            values_f64(&k_new)
        );
        assert_eq!(
            values_f64(&v_all.narrow(2, len as i64 - 1, 1)),
            values_f64(&v_new)
        );
        assert_eq!(values_f64(&k_all.narrow(2, 0, 8)), compressed_keys);
        assert_eq!(values_f64(&v_all.narrow(2, 0, 8)), compressed_values);
        // The new token's position is the number of tokens seen before it, in every row.
        let rows: Vec<&[i64]> = positions.chunks(len - 1).collect();
        positions = rows
            .iter()
            .flat_map(|r| r.iter().copied().chain([seen_before as i64]))
            .collect();
        assert_eq!(
            values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
            positions,
            "step {step}"
        );
    }
    assert_eq!(store.seen(), t + 5);
}

#[test]
fn compressing_again_keeps_original_positions() {
    // Compress the prompt, decode a few tokens, compress again: positions must refer to the
    // original sequence, not to indices into what was stored.
    let (b, h, t, d) = (1usize, 2usize, 20usize, 4usize);
    let keys = spread_keys([b as i64, h as i64, t as i64, d as i64], 30, Kind::Float);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &keys).unwrap();
    let press = Press::new(Box::new(Knorm), Budget::ratio(0.5).unwrap());
    press.compress(&mut store, Plan::prefill(0)).unwrap();
    let decode = spread_keys([b as i64, h as i64, 4, d as i64], 31, Kind::Float);
    for i in 0..4 {
        let tok = decode.narrow(2, i, 1);
        let _ = store.append(&tok, &tok).unwrap();
    }
    assert_eq!((store.len(), store.seen()), (14, 24));
    press.compress(&mut store, Plan::prefill(0)).unwrap();
    assert_eq!((store.len(), store.seen()), (7, 24));

    // Reference: the whole history (prompt + decoded), per row; the first press kept the 10
    // smallest prompt norms, the second the 7 smallest among those and the decoded tokens.
    let all = Tensor::cat(&[&keys, &decode], 2);
    let all_v = values_f64(&all);
    let norms = norms_f64(&all_v, d);
    let mut want_pos = Vec::new();
    for row in 0..b * h {
        let row_norms = &norms[row * 24..(row + 1) * 24];
        let first: Vec<i64> =
            reference_top_k(&row_norms[..20].iter().map(|n| -n).collect::<Vec<_>>(), 10);
        let candidates: Vec<i64> = first.iter().copied().chain(20..24).collect();
        let cand_scores: Vec<f64> = candidates.iter().map(|&p| -row_norms[p as usize]).collect();
        let second = reference_top_k(&cand_scores, 7);
        want_pos.extend(second.iter().map(|&i| candidates[i as usize]));
    }
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        want_pos
    );
    let want_keys = reference_gather(&all_v, (b, h, 24, d), &want_pos, 7);
    assert_eq!(values_f64(&store.keys_view().unwrap()), want_keys);
    assert_eq!(store.nbytes(), exact_bytes(b, h, 7, d, d, 4, true));
}

#[test]
fn streaming_llm_press_keeps_sinks_and_the_recent_window() {
    let (b, h, t, d) = (2usize, 2usize, 20usize, 4usize);
    let keys = randn(&[b as i64, h as i64, t as i64, d as i64], 40, Kind::Float);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &keys).unwrap();
    let press = Press::new(
        Box::new(StreamingLlm::new(2).unwrap()),
        Budget::max_tokens(6).unwrap(),
    );
    press.compress(&mut store, Plan::prefill(3)).unwrap();
    let idx: Vec<i64> = [0, 1, 16, 17, 18, 19].repeat(b * h);
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        idx
    );
    assert_eq!(
        values_f64(&store.keys_view().unwrap()),
        reference_gather(&values_f64(&keys), (b, h, t, d), &idx, 6)
    );
}

#[test]
fn random_press_depends_on_seed_and_layer_only() {
    let keys = randn(&[1, 2, 64, 4], 50, Kind::Float);
    let other = randn(&[1, 2, 64, 4], 51, Kind::Float);
    let run = |seed: u64, layer: usize, k: &Tensor| {
        let mut store = LayerStore::new();
        let _ = store.append(k, k).unwrap();
        Press::new(Box::new(Random::new(seed)), Budget::ratio(0.5).unwrap())
            .compress(&mut store, Plan::prefill(layer))
            .unwrap();
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap())
    };
    let base = run(1, 0, &keys);
    assert_eq!(base.len(), 64);
    assert_eq!(run(1, 0, &keys), base);
    assert_eq!(run(1, 0, &other), base);
    assert_ne!(run(2, 0, &keys), base);
    assert_ne!(run(1, 1, &keys), base);
}

#[test]
fn kept_indices_agree_through_the_kernels_and_libtorch() {
    let (b, h, t, d) = (2usize, 3usize, 18usize, 8usize);
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        let keys = spread_keys([b as i64, h as i64, t as i64, d as i64], 60, kind);
        let values = randn(&[b as i64, h as i64, t as i64, 4], 61, kind);
        let press = Press::new(Box::new(Knorm), Budget::ratio(0.25).unwrap());
        let idx = knorm_reference(&values_f64(&keys), t, d, 13);
        let kept = press.kept_indices(&keys, &values, 0).unwrap();
        assert_eq!(dims(&kept), [b, h, 13]);
        assert_eq!(values_i64(&kept), idx, "{kind:?}");
        kvpress_rs::tensor::set_cpu_kernels(false);
        let libtorch = press.kept_indices(&keys, &values, 0);
        kvpress_rs::tensor::set_cpu_kernels(true);
        assert_eq!(values_i64(&libtorch.unwrap()), idx, "{kind:?}");
        // A values tensor of another token count is rejected.
        let short = values.narrow(2, 0, 17);
        expect_err(press.kept_indices(&keys, &short, 0), "Shape");
    }
}

#[test]
fn non_finite_keys_or_values_are_rejected() {
    let (b, h, t, d) = (1i64, 2i64, 10i64, 4i64);
    for (target, bad) in [
        ("keys", f64::NAN),
        ("values", f64::NAN),
        ("keys", f64::INFINITY),
        ("values", f64::NEG_INFINITY),
    ] {
        for budget in [Budget::ratio(0.5).unwrap(), Budget::ratio(0.0).unwrap()] {
            for kind in [Kind::Float, Kind::BFloat16] {
                let mut k = values_f64(&randn(&[b, h, t, d], 70, Kind::Float));
                let mut v = values_f64(&randn(&[b, h, t, d], 71, Kind::Float));
                let poisoned = if target == "keys" { &mut k } else { &mut v };
                poisoned[45] = bad;
                let (keys, values) = (
                    tensor_f64(&k, &[b, h, t, d], kind),
                    tensor_f64(&v, &[b, h, t, d], kind),
                );
                let mut store = LayerStore::new();
                let _ = store.append(&keys, &values).unwrap();
                let press = Press::new(Box::new(Knorm), budget);
                let e = expect_err(press.compress(&mut store, Plan::prefill(0)), "NonFinite");
                assert!(e.to_string().contains(target), "{e}");
                assert_eq!((store.len(), store.seen()), (t as usize, t as usize));
                assert!(!store.has_evicted());
                expect_err(
                    press.kept_indices(&keys, &values, 0).map(|_| ()),
                    "NonFinite",
                );
            }
        }
    }
}

#[test]
fn invalid_compressions_leave_the_store_unchanged() {
    // Nothing to compress.
    let mut empty = LayerStore::new();
    expect_err(
        Press::new(Box::new(Knorm), Budget::ratio(0.5).unwrap())
            .compress(&mut empty, Plan::prefill(0)),
        "State",
    );
    // A ratio that keeps no token of 10: int(10 * (1 - 0.95)) = 0.
    let keys = randn(&[1, 2, 10, 4], 80, Kind::Float);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &keys).unwrap();
    expect_err(
        Press::new(Box::new(Knorm), Budget::ratio(0.95).unwrap())
            .compress(&mut store, Plan::prefill(0)),
        "InvalidArgument",
    );
    assert_eq!((store.len(), store.seen()), (10, 10));
    assert_eq!(store.keys_view().unwrap().data_ptr(), keys.data_ptr());
    // T = 7 at ratio 0.3 keeps int(4.8999999999999995) = 4.
    let keys = spread_keys([1, 2, 7, 4], 81, Kind::Float);
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &keys).unwrap();
    Press::new(Box::new(Knorm), Budget::ratio(0.3).unwrap())
        .compress(&mut store, Plan::prefill(0))
        .unwrap();
    assert_eq!(store.len(), 4);
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        knorm_reference(&values_f64(&keys), 7, 4, 4)
    );
}
