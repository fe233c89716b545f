//! LayerStore bookkeeping: append, crop, batch reordering, reset, retain and their errors.

mod common;

use common::*;
use kvpress_rs::policies::{Knorm, StreamingLlm};
use kvpress_rs::press::Plan;
use kvpress_rs::{Budget, LayerStore, Press};
use tch::{Kind, Tensor};

fn kv(shape: [i64; 4], seed: u64) -> (Tensor, Tensor) {
    (
        randn(&shape, seed, Kind::Float),
        randn(&shape, seed + 1000, Kind::Float),
    )
}

/// Flattened (b, h, t, d) data of a list of token chunks concatenated along t, by hand.
fn concat_tokens(chunks: &[&Tensor]) -> Vec<f64> {
    let s = dims(chunks[0]);
    let (b, h, d) = (s[0], s[1], s[3]);
    let parts: Vec<(Vec<f64>, usize)> =
        chunks.iter().map(|c| (values_f64(c), dims(c)[2])).collect();
    let mut out = Vec::new();
    for row in 0..b * h {
        for (data, t) in &parts {
            out.extend_from_slice(&data[row * t * d..(row + 1) * t * d]);
        }
    }
    out
}

/// Row `i` along axis 0 of a flattened tensor with `row_len` elements per batch row.
fn batch_row(data: &[f64], row_len: usize, i: usize) -> &[f64] {
    &data[i * row_len..(i + 1) * row_len]
}

/// A store holding a (b, h, t, d) prompt compressed by Knorm to `n_kept` tokens.
fn compressed_store(b: i64, h: i64, t: i64, d: i64, n_kept: i64, seed: u64) -> LayerStore {
    let (k, v) = kv([b, h, t, d], seed);
    let mut store = LayerStore::new();
    let _ = store.append(&k, &v).unwrap();
    Press::new(Box::new(Knorm), Budget::max_tokens(n_kept).unwrap())
        .compress(&mut store, Plan::prefill(0))
        .unwrap();
    store
}

/// Everything observable about a store, to compare states.
fn snapshot(store: &LayerStore) -> (usize, usize, Vec<f64>, Vec<f64>, Vec<i64>) {
    (
        store.seen(),
        store.len(),
        values_f64(&store.keys_view().unwrap()),
        values_f64(&store.values_view().unwrap()),
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
    )
}

#[test]
fn a_new_store_is_empty() {
    let mut store = LayerStore::new();
    assert_eq!((store.seen(), store.len(), store.nbytes()), (0, 0, 0));
    assert!(store.is_empty());
    assert!(!store.has_evicted());
    expect_err(store.keys_view(), "State");
    expect_err(store.values_view(), "State");
    expect_err(store.kept_positions(), "State");
    expect_err(
        store.retain(&Tensor::zeros([1, 1, 1], (Kind::Int64, CPU))),
        "State",
    );
    // Operations without anything to act on are no-ops.
    store.crop(3).unwrap();
    store.index_batch(&tensor_i64(&[0], &[1])).unwrap();
    store.repeat_interleave_batch(2).unwrap();
    assert_eq!((store.seen(), store.len(), store.nbytes()), (0, 0, 0));
}

#[test]
fn the_first_append_adopts_the_tensors_without_copy() {
    let (k, v) = (
        randn(&[2, 3, 7, 8], 1, Kind::Half),
        randn(&[2, 3, 7, 4], 2, Kind::Half),
    );
    let mut store = LayerStore::new();
    let (k_all, v_all) = store.append(&k, &v).unwrap();
    assert_eq!(k_all.data_ptr(), k.data_ptr());
    assert_eq!(v_all.data_ptr(), v.data_ptr());
    assert_eq!(store.keys_view().unwrap().data_ptr(), k.data_ptr());
    assert_eq!((store.seen(), store.len()), (7, 7));
    assert!(!store.is_empty());
    assert!(!store.has_evicted());
    assert_eq!(store.nbytes(), 2 * 3 * 7 * (8 + 4) * 2);
    let all: Vec<i64> = (0..7).collect();
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        all.repeat(6)
    );
}

#[test]
fn decode_appends_extend_the_sequence() {
    let (k0, v0) = kv([2, 2, 6, 4], 10);
    let k0_before = values_f64(&k0);
    let mut store = LayerStore::new();
    let _ = store.append(&k0, &v0).unwrap();
    let mut k_chunks = vec![k0.shallow_clone()];
    let mut v_chunks = vec![v0.shallow_clone()];
    for (step, q) in [1, 1, 3, 1].into_iter().enumerate() {
        let (k, v) = kv([2, 2, q, 4], 20 + step as u64);
        let (k_all, v_all) = store.append(&k, &v).unwrap();
        k_chunks.push(k);
        v_chunks.push(v);
        let seen: usize = k_chunks.iter().map(|c| dims(c)[2]).sum();
        assert_eq!((store.seen(), store.len()), (seen, seen));
        assert_eq!(
            values_f64(&k_all),
            concat_tokens(&k_chunks.iter().collect::<Vec<_>>())
        );
        assert_eq!(
            values_f64(&v_all),
            concat_tokens(&v_chunks.iter().collect::<Vec<_>>())
        );
        let all: Vec<i64> = (0..seen as i64).collect();
        assert_eq!(
            values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
            all.repeat(4)
        );
        assert!(!store.has_evicted());
        // Spare capacity may be held, never less than the data.
        assert!(store.nbytes() >= 2 * 2 * seen * 8 * 4);
    }
    // The store never wrote into the tensor it adopted.
    assert_eq!(values_f64(&k0), k0_before);
}

#[test]
fn mismatched_appends_are_errors_and_change_nothing() {
    let (k, v) = kv([2, 3, 5, 8], 30);
    let mut store = LayerStore::new();
    let _ = store.append(&k, &v).unwrap();
    let before = snapshot(&store);
    let f = |shape: [i64; 4]| randn(&shape, 31, Kind::Float);
    let cases: Vec<(&str, Tensor, Tensor, &str)> = vec![
        ("heads", f([2, 2, 1, 8]), f([2, 2, 1, 8]), "Shape"),
        ("batch", f([1, 3, 1, 8]), f([1, 3, 1, 8]), "Shape"),
        ("key head_dim", f([2, 3, 1, 4]), f([2, 3, 1, 8]), "Shape"),
        (
            "value head_dim",
            f([2, 3, 1, 8]),
            f([2, 3, 1, 4]),
            "InvalidArgument",
        ),
        (
            "dtype",
            f([2, 3, 1, 8]).to_kind(Kind::Half),
            f([2, 3, 1, 8]).to_kind(Kind::Half),
            "Dtype",
        ),
        (
            "bf16",
            f([2, 3, 1, 8]).to_kind(Kind::BFloat16),
            f([2, 3, 1, 8]).to_kind(Kind::BFloat16),
            "Dtype",
        ),
        (
            "k/v dtype",
            f([2, 3, 1, 8]),
            f([2, 3, 1, 8]).to_kind(Kind::Half),
            "Dtype",
        ),
        (
            "int dtype",
            f([2, 3, 1, 8]).to_kind(Kind::Int),
            f([2, 3, 1, 8]).to_kind(Kind::Int),
            "Dtype",
        ),
        ("k/v tokens", f([2, 3, 2, 8]), f([2, 3, 1, 8]), "Shape"),
        ("zero tokens", f([2, 3, 0, 8]), f([2, 3, 0, 8]), "Empty"),
        (
            "rank 3",
            f([2, 3, 1, 8]).select(2, 0),
            f([2, 3, 1, 8]).select(2, 0),
            "Shape",
        ),
        ("zero head_dim", f([2, 3, 1, 0]), f([2, 3, 1, 0]), "Shape"),
    ];
    for (what, k2, v2, variant) in cases {
        let r = store.append(&k2, &v2);
        assert!(r.is_err(), "{what}: expected an error");
        expect_err(r.map(|_| ()), variant);
        assert_eq!(snapshot(&store), before, "{what} changed the store");
    }
    // A good append still works afterwards.
    let (k2, v2) = kv([2, 3, 1, 8], 32);
    let _ = store.append(&k2, &v2).unwrap();
    assert_eq!(store.seen(), 6);
}

#[test]
fn an_empty_first_append_is_an_error() {
    let mut store = LayerStore::new();
    let (k, v) = kv([1, 2, 0, 4], 40);
    expect_err(store.append(&k, &v).map(|_| ()), "Empty");
    assert!(store.is_empty());
    expect_err(store.keys_view(), "State");
}

#[test]
fn crop_removes_decoded_tokens() {
    let (k0, v0) = kv([1, 2, 10, 4], 50);
    let mut store = LayerStore::new();
    let _ = store.append(&k0, &v0).unwrap();
    let (k1, v1) = kv([1, 2, 1, 4], 51);
    let _ = store.append(&k1, &v1).unwrap();
    let after_first = snapshot(&store);
    for seed in 52..54 {
        let (k, v) = kv([1, 2, 1, 4], seed);
        let _ = store.append(&k, &v).unwrap();
    }
    assert_eq!(store.seen(), 13);
    store.crop(0).unwrap();
    assert_eq!(store.seen(), 13);
    store.crop(2).unwrap();
    assert_eq!(snapshot(&store), after_first);
    assert_eq!(store.nbytes(), 2 * 11 * 4 * 4 * 2);
    assert_eq!(
        values_f64(&store.keys_view().unwrap()),
        concat_tokens(&[&k0, &k1])
    );
    // Decoding continues at the cropped position.
    let (k, v) = kv([1, 2, 1, 4], 55);
    let (k_all, _) = store.append(&k, &v).unwrap();
    assert_eq!(store.seen(), 12);
    assert_eq!(values_f64(&k_all), concat_tokens(&[&k0, &k1, &k]));
    // More than seen is an error; everything seen can be removed.
    expect_err(store.crop(13), "InvalidArgument");
    assert_eq!(store.seen(), 12);
    store.crop(12).unwrap();
    assert_eq!((store.seen(), store.len()), (0, 0));
}

#[test]
fn crop_after_compression_restores_the_earlier_state() {
    let mut store = compressed_store(2, 2, 16, 4, 8, 60);
    let (k, v) = kv([2, 2, 1, 4], 61);
    let _ = store.append(&k, &v).unwrap();
    let after_first = snapshot(&store);
    assert_eq!(*after_first.4.last().unwrap(), 16);
    for seed in 62..64 {
        let (k, v) = kv([2, 2, 1, 4], seed);
        let _ = store.append(&k, &v).unwrap();
    }
    assert_eq!((store.seen(), store.len()), (19, 11));
    store.crop(2).unwrap();
    assert_eq!(snapshot(&store), after_first);
    assert!(store.has_evicted());
    // Exact storage after a crop: keys, values and int32 positions of 9 tokens.
    assert_eq!(store.nbytes(), 2 * 2 * 9 * (4 + 4) * 4 + 2 * 2 * 9 * 4);
    // The next token takes position 17 again.
    let (k, v) = kv([2, 2, 1, 4], 64);
    let _ = store.append(&k, &v).unwrap();
    let pos = values_i64(&store.kept_positions().unwrap().into_uniform().unwrap());
    assert!(
        pos.chunks(10).all(|row| row[9] == 17 && row[8] == 16),
        "{pos:?}"
    );
}

#[test]
fn crop_into_tokens_evicted_from_some_heads_only_is_an_error() {
    // Two heads with opposite norm orders: Knorm keeps tokens 3..6 in head 0, 0..3 in head 1.
    let keys = tensor_f64(
        &[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        &[1, 2, 6, 1],
        Kind::Float,
    );
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &keys).unwrap();
    Press::new(Box::new(Knorm), Budget::max_tokens(3).unwrap())
        .compress(&mut store, Plan::prefill(0))
        .unwrap();
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        [3, 4, 5, 0, 1, 2]
    );
    let before = snapshot(&store);
    for n in [1, 2, 4] {
        expect_err(store.crop(n), "State");
        assert_eq!(snapshot(&store), before);
    }
    // Removing all six tokens removes three from every head: allowed.
    store.crop(6).unwrap();
    assert_eq!((store.seen(), store.len()), (0, 0));
}

#[test]
fn crop_into_a_uniformly_compressed_prompt() {
    // StreamingLLM keeps the same tokens in every head: 0 and 7, 8, 9 of 10.
    let (k, v) = kv([2, 2, 10, 4], 70);
    let mut store = LayerStore::new();
    let _ = store.append(&k, &v).unwrap();
    Press::new(
        Box::new(StreamingLlm::new(1).unwrap()),
        Budget::max_tokens(4).unwrap(),
    )
    .compress(&mut store, Plan::prefill(0))
    .unwrap();
    store.crop(2).unwrap();
    assert_eq!((store.seen(), store.len()), (8, 2));
    let idx: Vec<i64> = [0, 7].repeat(4);
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        idx
    );
    assert_eq!(
        values_f64(&store.keys_view().unwrap()),
        reference_gather(&values_f64(&k), (2, 2, 10, 4), &idx, 2)
    );
    assert_eq!(
        values_f64(&store.values_view().unwrap()),
        reference_gather(&values_f64(&v), (2, 2, 10, 4), &idx, 2)
    );
}

#[test]
fn views_handed_out_are_never_overwritten() {
    let mut store = compressed_store(1, 2, 12, 4, 6, 80);
    let (k, v) = kv([1, 2, 1, 4], 81);
    let (held_k, held_v) = store.append(&k, &v).unwrap();
    let (want_k, want_v) = (values_f64(&held_k), values_f64(&held_v));
    // Appends write after the held tokens; a crop then an append must not write into them.
    for seed in 82..85 {
        let (k, v) = kv([1, 2, 1, 4], seed);
        let _ = store.append(&k, &v).unwrap();
    }
    store.crop(4).unwrap();
    let (k, v) = kv([1, 2, 2, 4], 86);
    let _ = store.append(&k, &v).unwrap();
    store.index_batch(&tensor_i64(&[0], &[1])).unwrap();
    let _ = store
        .append(&k.narrow(2, 0, 1), &v.narrow(2, 0, 1))
        .unwrap();
    assert_eq!(values_f64(&held_k), want_k);
    assert_eq!(values_f64(&held_v), want_v);
}

#[test]
fn index_batch_reorders_and_selects_rows() {
    let (b, h, t, d) = (3, 2, 12, 4);
    let mut store = compressed_store(b, h, t, d, 5, 90);
    let (k, v) = kv([b, h, 1, d], 91);
    let _ = store.append(&k, &v).unwrap();
    let (seen, len, keys, values, pos) = snapshot(&store);
    let (row_kv, row_pos) = ((h * 6 * d) as usize, (h * 6) as usize);
    // Rows of the compressed store differ, so a reordering is visible.
    assert_ne!(batch_row(&keys, row_kv, 0), batch_row(&keys, row_kv, 1));
    assert_ne!(pos[..row_pos], pos[row_pos..2 * row_pos]);

    let perm = [2usize, 0, 1];
    store
        .index_batch(&tensor_i64(&perm.map(|p| p as i64), &[3]))
        .unwrap();
    let after = snapshot(&store);
    assert_eq!((after.0, after.1), (seen, len));
    for (i, &p) in perm.iter().enumerate() {
        assert_eq!(batch_row(&after.2, row_kv, i), batch_row(&keys, row_kv, p));
        assert_eq!(
            batch_row(&after.3, row_kv, i),
            batch_row(&values, row_kv, p)
        );
        assert_eq!(
            after.4[i * row_pos..(i + 1) * row_pos],
            pos[p * row_pos..(p + 1) * row_pos]
        );
    }
    // Selecting one row: the store now has batch 1, and only batch-1 appends fit.
    store.index_batch(&tensor_i64(&[1], &[1])).unwrap();
    let one = snapshot(&store);
    assert_eq!(
        dims(&store.keys_view().unwrap()),
        [1, h as usize, 6, d as usize]
    );
    assert_eq!(one.2, batch_row(&keys, row_kv, 0));
    let (k3, v3) = kv([3, h, 1, d], 92);
    expect_err(store.append(&k3, &v3).map(|_| ()), "Shape");
    let (k1, v1) = kv([1, h, 1, d], 93);
    let _ = store.append(&k1, &v1).unwrap();
    assert_eq!((store.seen(), store.len()), (seen + 1, len + 1));
    let last_pos = values_i64(&store.kept_positions().unwrap().into_uniform().unwrap());
    assert!(last_pos.chunks(7).all(|r| r[6] == seen as i64));
}

#[test]
fn index_batch_with_an_out_of_range_row_is_an_error() {
    let mut store = compressed_store(2, 2, 8, 4, 4, 95);
    let before = snapshot(&store);
    assert!(store.index_batch(&tensor_i64(&[0, 2], &[2])).is_err());
    assert_eq!(snapshot(&store), before);
}

#[test]
fn repeat_interleave_batch_doubles_rows() {
    let (b, h, t, d) = (2, 2, 10, 4);
    let mut store = compressed_store(b, h, t, d, 4, 100);
    let (seen, len, keys, values, pos) = snapshot(&store);
    store.repeat_interleave_batch(2).unwrap();
    let after = snapshot(&store);
    assert_eq!((after.0, after.1), (seen, len));
    assert_eq!(
        dims(&store.keys_view().unwrap()),
        [4, h as usize, 4, d as usize]
    );
    let (row_kv, row_pos) = ((h * 4 * d) as usize, (h * 4) as usize);
    for i in 0..4 {
        assert_eq!(
            batch_row(&after.2, row_kv, i),
            batch_row(&keys, row_kv, i / 2)
        );
        assert_eq!(
            batch_row(&after.3, row_kv, i),
            batch_row(&values, row_kv, i / 2)
        );
        assert_eq!(
            after.4[i * row_pos..(i + 1) * row_pos],
            pos[(i / 2) * row_pos..(i / 2 + 1) * row_pos]
        );
    }
    // Appends must now carry batch 4.
    let (k2, v2) = kv([2, h, 1, d], 101);
    expect_err(store.append(&k2, &v2).map(|_| ()), "Shape");
    let (k4, v4) = kv([4, h, 1, d], 102);
    let _ = store.append(&k4, &v4).unwrap();
    // Once is a no-op; zero or negative repeats are errors.
    let before = snapshot(&store);
    store.repeat_interleave_batch(1).unwrap();
    assert_eq!(snapshot(&store), before);
    expect_err(store.repeat_interleave_batch(0), "InvalidArgument");
    expect_err(store.repeat_interleave_batch(-2), "InvalidArgument");
    assert_eq!(snapshot(&store), before);
}

#[test]
fn reset_empties_the_store() {
    let mut store = compressed_store(2, 2, 10, 4, 4, 110);
    let (k, v) = kv([2, 2, 1, 4], 111);
    let _ = store.append(&k, &v).unwrap();
    store.reset();
    assert_eq!((store.seen(), store.len(), store.nbytes()), (0, 0, 0));
    assert!(store.is_empty());
    assert!(!store.has_evicted());
    expect_err(store.keys_view(), "State");
    // Any layout is accepted again.
    let k = randn(&[1, 4, 3, 16], 112, Kind::BFloat16);
    let (k_all, _) = store.append(&k, &k).unwrap();
    assert_eq!(k_all.data_ptr(), k.data_ptr());
    assert_eq!((store.seen(), store.len()), (3, 3));
    let all: Vec<i64> = (0..3).collect();
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        all.repeat(4)
    );
}

#[test]
fn retain_keeps_the_given_tokens_and_checks_them() {
    let (k, v) = kv([1, 2, 8, 4], 120);
    let mut store = LayerStore::new();
    let _ = store.append(&k, &v).unwrap();
    let before = snapshot(&store);
    for (bad, variant) in [
        (vec![1, 0, 2, 3, 4, 5], "InvalidArgument"), // not ascending
        (vec![1, 1, 2, 3, 4, 5], "InvalidArgument"), // duplicate
        (vec![0, 1, 2, 3, 4, 8], "InvalidArgument"), // out of range
        (vec![-2, 1, 2, 3, 4, 5], "InvalidArgument"), // below the filler index −1
        (vec![1, -1, 2, 3, 4, 5], "InvalidArgument"), // a filler after a token
    ] {
        expect_err(store.retain(&tensor_i64(&bad, &[1, 2, 3])), variant);
        assert_eq!(snapshot(&store), before, "{bad:?}");
    }
    expect_err(
        store.retain(&tensor_i64(&[0, 1, 2, 3], &[2, 2, 1])),
        "Shape",
    );
    expect_err(
        store.retain(&tensor_i64(&[0, 1, 2, 3], &[1, 2, 2]).to_kind(Kind::Int)),
        "Dtype",
    );
    assert_eq!(snapshot(&store), before);

    // −1 leading a row is a filler slot (a padded row keeping fewer tokens): position −1
    let mut padded = LayerStore::new();
    let _ = padded.append(&k, &v).unwrap();
    padded
        .retain(&tensor_i64(&[-1, 1, 2, 0, 3, 7], &[1, 2, 3]))
        .unwrap();
    assert_eq!(
        values_i64(&padded.kept_positions().unwrap().into_uniform().unwrap()),
        [-1, 1, 2, 0, 3, 7]
    );

    let idx = [0i64, 3, 7, 2, 5, 6];
    store.retain(&tensor_i64(&idx, &[1, 2, 3])).unwrap();
    assert_eq!((store.seen(), store.len()), (8, 3));
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        idx
    );
    assert_eq!(
        values_f64(&store.keys_view().unwrap()),
        reference_gather(&values_f64(&k), (1, 2, 8, 4), &idx, 3)
    );
    // A second retain indexes into what is stored; positions compose.
    store
        .retain(&tensor_i64(&[1, 2, 0, 2], &[1, 2, 2]))
        .unwrap();
    assert_eq!(
        values_i64(&store.kept_positions().unwrap().into_uniform().unwrap()),
        [3, 7, 2, 6]
    );
    assert_eq!(
        values_f64(&store.values_view().unwrap()),
        reference_gather(&values_f64(&v), (1, 2, 8, 4), &[3, 7, 2, 6], 2)
    );
}

#[test]
fn index_batch_rejects_an_empty_or_out_of_range_selection() {
    let mut store = compressed_store(2, 2, 8, 4, 4, 130);
    expect_err(
        store.index_batch(&Tensor::zeros([0], (Kind::Int64, CPU))),
        "Shape",
    );
    expect_err(
        store.index_batch(&Tensor::from_slice(&[0i64, 2])),
        "InvalidArgument",
    );
    expect_err(store.index_batch(&Tensor::from_slice(&[0i32, 1])), "Dtype");
    expect_err(
        store.index_batch(&Tensor::zeros([1, 2], (Kind::Int64, CPU))),
        "Shape",
    );
    // the store is unchanged
    assert_eq!(dims(&store.keys_view().unwrap()), [2, 2, 4, 4]);
    assert_eq!((store.seen(), store.len()), (8, 4));
}
