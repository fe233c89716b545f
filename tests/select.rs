//! Top-k selection: exact kept indices, tie-breaking, CPU kernel vs libtorch, and errors.

mod common;

use common::*;
use kvpress_rs::select::{top_k_indices, top_k_indices_cpu, top_k_indices_libtorch};
use ndarray::{Array3, ShapeBuilder};
use tch::Kind;

/// Runs `top_k_indices` and returns (shape, flat indices); checks dtype int64.
fn top_k(scores: &tch::Tensor, k: usize) -> (Vec<usize>, Vec<i64>) {
    let out = top_k_indices(scores, k).unwrap();
    assert_eq!(out.kind(), Kind::Int64);
    (dims(&out), values_i64(&out))
}

fn top_k_lt(scores: &tch::Tensor, k: usize) -> (Vec<usize>, Vec<i64>) {
    let out = top_k_indices_libtorch(scores, k).unwrap();
    assert_eq!(out.kind(), Kind::Int64);
    (dims(&out), values_i64(&out))
}

#[test]
fn known_permutation_keeps_the_highest_scores_in_token_order() {
    // Row 0: token 1 has the highest score (7), then token 3 (6), token 5 (5), token 7 (4)...
    let row0 = [3.0, 7.0, 1.0, 6.0, 0.0, 5.0, 2.0, 4.0];
    // Row 1: reversed ranking: the highest scores sit at the end of the row.
    let row1 = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
    let scores = tensor_f64(&[row0, row1].concat(), &[1, 2, 8], Kind::Float);

    let expected: [(usize, [&[i64]; 2]); 5] = [
        (1, [&[1], &[7]]),
        (2, [&[1, 3], &[6, 7]]),
        (3, [&[1, 3, 5], &[5, 6, 7]]),
        (5, [&[0, 1, 3, 5, 7], &[3, 4, 5, 6, 7]]),
        (8, [&[0, 1, 2, 3, 4, 5, 6, 7], &[0, 1, 2, 3, 4, 5, 6, 7]]),
    ];
    for (k, rows) in expected {
        let want: Vec<i64> = rows.concat();
        assert_eq!(top_k(&scores, k), (vec![1, 2, k], want.clone()), "k = {k}");
        assert_eq!(
            top_k_lt(&scores, k),
            (vec![1, 2, k], want),
            "libtorch, k = {k}"
        );
    }
}

#[test]
fn ties_go_to_the_earlier_token() {
    let cases: [(&[f64], usize, &[i64]); 8] = [
        (&[1.0, 2.0, 2.0, 2.0, 1.0, 2.0], 2, &[1, 2]),
        (&[1.0, 2.0, 2.0, 2.0, 1.0, 2.0], 4, &[1, 2, 3, 5]),
        (&[1.0, 2.0, 2.0, 2.0, 1.0, 2.0], 5, &[0, 1, 2, 3, 5]),
        (&[5.0; 9], 3, &[0, 1, 2]),
        (&[0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], 3, &[1, 2, 4]),
        // -0.0 and 0.0 compare equal: the earlier one wins either way round.
        (&[0.0, -0.0, -1.0], 1, &[0]),
        (&[-0.0, 0.0, -1.0], 1, &[0]),
        // Infinities rank like any other value.
        (
            &[f64::NEG_INFINITY, 1.0, f64::INFINITY, f64::INFINITY, 0.0],
            2,
            &[2, 3],
        ),
    ];
    for (row, k, want) in cases {
        let scores = tensor_f64(row, &[1, 1, row.len() as i64], Kind::Float);
        assert_eq!(top_k(&scores, k).1, want, "cpu: {row:?}, k = {k}");
        assert_eq!(top_k_lt(&scores, k).1, want, "libtorch: {row:?}, k = {k}");
    }
}

#[test]
fn random_scores_match_a_sorting_reference() {
    for (seed, (b, h, t)) in [
        (1, (1, 1, 5)),
        (2, (2, 3, 17)),
        (3, (3, 2, 64)),
        (4, (1, 8, 33)),
    ] {
        let n = b * h * t;
        let vals: Vec<f64> = Rng::new(seed)
            .normals(n)
            .iter()
            .map(|&v| v as f32 as f64)
            .collect();
        let scores = tensor_f64(&vals, &[b as i64, h as i64, t as i64], Kind::Float);
        for k in [1, 2, t / 3 + 1, t / 2, t - 1, t] {
            if k == 0 {
                continue;
            }
            let want = reference_top_k_rows(&vals, t, k);
            assert_eq!(
                top_k(&scores, k),
                (vec![b, h, k], want.clone()),
                "seed {seed}, k = {k}"
            );
            assert_eq!(
                top_k_lt(&scores, k),
                (vec![b, h, k], want),
                "libtorch seed {seed}, k = {k}"
            );
        }
    }
}

#[test]
fn cpu_kernel_and_libtorch_agree_with_many_ties() {
    // bf16-like quantization: values on a coarse grid, so most scores tie with others.
    let (b, h, t) = (2, 4, 48);
    let mut rng = Rng::new(11);
    let vals: Vec<f64> = (0..b * h * t)
        .map(|_| (rng.normal() * 2.0).round() / 4.0)
        .collect();
    let scores = tensor_f64(&vals, &[b as i64, h as i64, t as i64], Kind::Float);
    let distinct = {
        let mut v: Vec<i64> = vals.iter().map(|x| (x * 4.0) as i64).collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    };
    assert!(
        distinct < 16,
        "the test needs heavy ties, got {distinct} distinct values"
    );
    for k in 1..=t {
        let want = reference_top_k_rows(&vals, t, k);
        let cpu = top_k(&scores, k);
        let lt = top_k_lt(&scores, k);
        assert_eq!(cpu.1, want, "cpu, k = {k}");
        assert_eq!(lt.1, want, "libtorch, k = {k}");
    }

    // Real bf16 scores (rounded from random normals): same answer from both paths, and
    // from the float32 copy of the same values.
    let bf = randn(&[b as i64, h as i64, t as i64], 12, Kind::BFloat16);
    let vals = values_f64(&bf);
    for k in [1, 5, 24, 47] {
        let want = reference_top_k_rows(&vals, t, k);
        assert_eq!(top_k(&bf, k).1, want, "bf16 cpu, k = {k}");
        assert_eq!(top_k_lt(&bf, k).1, want, "bf16 libtorch, k = {k}");
        assert_eq!(
            top_k(&bf.to_kind(Kind::Float), k).1,
            want,
            "f32 copy, k = {k}"
        );
    }
}

#[test]
fn non_contiguous_scores_are_read_through_their_strides() {
    // (b, t, h) scores transposed to (b, h, t): the token axis has stride h.
    let (b, h, t) = (2, 3, 20);
    let base = randn(&[b, t, h], 21, Kind::Float);
    let scores = base.transpose(1, 2);
    assert!(!scores.is_contiguous());
    let vals = values_f64(&scores);
    for k in [1, 7, 19] {
        let want = reference_top_k_rows(&vals, t as usize, k);
        assert_eq!(top_k(&scores, k).1, want, "transposed, k = {k}");
        assert_eq!(top_k_lt(&scores, k).1, want, "transposed libtorch, k = {k}");
    }
    // A narrowed window with a storage offset.
    let wide = randn(&[b, h, 3 * t], 22, Kind::Float);
    let window = wide.narrow(2, t, t);
    let vals = values_f64(&window);
    for k in [1, 10] {
        assert_eq!(
            top_k(&window, k).1,
            reference_top_k_rows(&vals, t as usize, k),
            "narrowed, k = {k}"
        );
    }
    // An expanded row (stride 0 over batch and heads): every row keeps the same tokens.
    let row = [0.5, -1.0, 2.0, 2.0, 0.0, 3.0];
    let expanded = tensor_f64(&row, &[1, 1, 6], Kind::Float).expand([2, 3, 6], false);
    assert_eq!(top_k(&expanded, 3), (vec![2, 3, 3], [2, 3, 5].repeat(6)));
}

#[test]
fn cpu_kernel_on_ndarray_views() {
    let (b, h, t, k) = (2, 2, 9, 4);
    let vals: Vec<f64> = Rng::new(31)
        .normals(b * h * t)
        .iter()
        .map(|&v| v as f32 as f64)
        .collect();
    let scores =
        Array3::from_shape_vec((b, h, t), vals.iter().map(|&v| v as f32).collect()).unwrap();
    let mut out = Array3::<i64>::zeros((b, h, k));
    top_k_indices_cpu(scores.view(), out.view_mut()).unwrap();
    assert_eq!(
        out.iter().copied().collect::<Vec<_>>(),
        reference_top_k_rows(&vals, t, k)
    );

    // A column-major (Fortran-order) score array: logical indexing is what counts.
    let f_scores = Array3::from_shape_vec((b, h, t).f(), vec![0.0f32; b * h * t]).unwrap();
    let mut f_scores = f_scores;
    f_scores.assign(&scores);
    let mut out2 = Array3::<i64>::zeros((b, h, k));
    top_k_indices_cpu(f_scores.view(), out2.view_mut()).unwrap();
    assert_eq!(out2, out);

    // Output of the wrong shape, k = 0, k > t, or a non-contiguous output: errors.
    let mut bad = Array3::<i64>::zeros((b, h + 1, k));
    expect_err(top_k_indices_cpu(scores.view(), bad.view_mut()), "Shape");
    let mut zero_k = Array3::<i64>::zeros((b, h, 0));
    expect_err(top_k_indices_cpu(scores.view(), zero_k.view_mut()), "Shape");
    let mut big_k = Array3::<i64>::zeros((b, h, t + 1));
    expect_err(top_k_indices_cpu(scores.view(), big_k.view_mut()), "Shape");
    let mut f_out = Array3::<i64>::zeros((b, h, k).f());
    expect_err(
        top_k_indices_cpu(scores.view(), f_out.view_mut()),
        "InvalidArgument",
    );

    let mut nan = scores.clone();
    nan[[1, 0, 3]] = f32::NAN;
    expect_err(top_k_indices_cpu(nan.view(), out.view_mut()), "NonFinite");
}

#[test]
fn invalid_k_rank_and_nan_are_errors() {
    let scores = randn(&[2, 3, 10], 41, Kind::Float);
    expect_err(top_k_indices(&scores, 0), "InvalidArgument");
    expect_err(top_k_indices(&scores, 11), "InvalidArgument");
    expect_err(top_k_indices(&scores, usize::MAX), "InvalidArgument");
    expect_err(top_k_indices(&randn(&[3, 10], 42, Kind::Float), 2), "Shape");
    expect_err(top_k_indices(&randn(&[10], 42, Kind::Float), 2), "Shape");
    expect_err(
        top_k_indices(&randn(&[1, 2, 3, 10], 43, Kind::Float), 2),
        "Shape",
    );
    // Zero tokens: no k is valid.
    expect_err(
        top_k_indices(&randn(&[2, 3, 0], 44, Kind::Float), 1),
        "InvalidArgument",
    );

    let mut vals = values_f64(&scores);
    vals[17] = f64::NAN;
    let nan = tensor_f64(&vals, &[2, 3, 10], Kind::Float);
    expect_err(top_k_indices(&nan, 3), "NonFinite");
    expect_err(top_k_indices_libtorch(&nan, 3), "NonFinite");
    expect_err(top_k_indices(&nan.to_kind(Kind::BFloat16), 3), "NonFinite");
    expect_err(
        top_k_indices_libtorch(&nan.to_kind(Kind::Half), 3),
        "NonFinite",
    );
}

#[test]
fn float64_scores_are_ranked_without_rounding() {
    // 1 + 1e-9 > 1 in float64, but both round to 1.0f32: the kept token must still be #1.
    let scores = tensor_f64(&[1.0, 1.0 + 1e-9, 0.5], &[1, 1, 3], Kind::Double);
    assert_eq!(top_k(&scores, 1).1, [1]);
    assert_eq!(top_k_lt(&scores, 1).1, [1]);
    // int64 scores above 2^24 are not all representable in float32 either.
    let ints = tensor_i64(&[1 << 24, (1 << 24) + 1, 0], &[1, 1, 3]);
    assert_eq!(top_k(&ints, 1).1, [1]);
}
