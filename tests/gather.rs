//! Gathering kept tokens: a loop reference for every dtype and layout, CPU vs libtorch, errors.

mod common;

use common::*;
use kvpress_rs::gather::{gather_tokens, gather_tokens_cpu, gather_tokens_libtorch};
use ndarray::{Array3, Array4};
use tch::{Kind, Tensor};

/// Random int64 indices (b, h, k) in [0, t), unsorted and with repeats.
fn random_indices(b: usize, h: usize, k: usize, t: usize, seed: u64) -> (Vec<i64>, Tensor) {
    let mut rng = Rng::new(seed);
    let idx: Vec<i64> = (0..b * h * k).map(|_| rng.below(t as u64) as i64).collect();
    let tensor = tensor_i64(&idx, &[b as i64, h as i64, k as i64]);
    (idx, tensor)
}

/// A (b, h, t, d) tensor of the given kind with distinct, exactly representable values.
fn data(shape: [i64; 4], seed: u64, kind: Kind) -> Tensor {
    match kind {
        Kind::Int | Kind::Int64 => {
            let n: i64 = shape.iter().product();
            let mut rng = Rng::new(seed);
            let v: Vec<f64> = (0..n)
                .map(|_| rng.below(1 << 20) as f64 - (1 << 19) as f64)
                .collect();
            tensor_f64(&v, &shape, kind)
        }
        _ => randn(&shape, seed, kind),
    }
}

/// Gathers `x` (any layout) with random indices and checks the CPU kernel against the loop
/// reference and against the libtorch path.
fn check_gather(x: &Tensor, k: usize, seed: u64) {
    let s = dims(x);
    let (b, h, t) = (s[0], s[1], s[2]);
    let d = if s.len() == 4 { s[3] } else { 1 };
    let (idx, indices) = random_indices(b, h, k, t, seed);
    let out = gather_tokens(x, &indices).unwrap();
    let mut want_shape = s.clone();
    want_shape[2] = k;
    assert_eq!(dims(&out), want_shape);
    assert_eq!(out.kind(), x.kind());
    assert!(out.is_contiguous());
    let want = reference_gather(&values_f64(x), (b, h, t, d), &idx, k);
    assert_eq!(
        values_f64(&out),
        want,
        "{:?} {:?} stride {:?}",
        x.kind(),
        s,
        x.stride()
    );
    let lt = gather_tokens_libtorch(x, &indices).unwrap();
    assert!(
        lt.equal(&out),
        "libtorch path disagrees for {:?} {:?}",
        x.kind(),
        s
    );
}

fn check_dtype(kind: Kind) {
    check_gather(&data([2, 3, 13, 8], 1, kind), 5, 100);
    check_gather(&data([1, 1, 4, 3], 2, kind), 9, 101); // k > t: indices repeat
    check_gather(&data([3, 2, 17, 1], 3, kind), 17, 102);
}

#[test]
fn gather_f32_matches_loop_reference() {
    check_dtype(Kind::Float);
}

#[test]
fn gather_f16_matches_loop_reference() {
    check_dtype(Kind::Half);
}

#[test]
fn gather_bf16_matches_loop_reference() {
    check_dtype(Kind::BFloat16);
}

#[test]
fn gather_int32_and_int64_match_loop_reference() {
    check_dtype(Kind::Int);
    check_dtype(Kind::Int64);
}

#[test]
fn gather_rank3_positions() {
    // Rank-3 (b, h, t) tensors, as the int32 kept positions are.
    let (b, h, t) = (2, 3, 11);
    let pos: Vec<f64> = (0..b * h * t).map(|i| (i * 7 % 101) as f64).collect();
    let x = tensor_f64(&pos, &[b as i64, h as i64, t as i64], Kind::Int);
    check_gather(&x, 4, 200);
    check_gather(&x.transpose(0, 1).contiguous().transpose(0, 1), 6, 201);
    check_gather(&randn(&[2, 2, 9], 5, Kind::Float), 3, 202);
}

fn check_layouts(kind: Kind) {
    let (b, t, h, d) = (2i64, 15i64, 3i64, 8i64);
    // (b, t, h, d) transposed to (b, h, t, d): what a model's projections produce.
    let bthd = data([b, t, h, d], 10, kind);
    let x = bthd.transpose(1, 2);
    assert!(!x.is_contiguous());
    check_gather(&x, 6, 300);
    // A token window with a storage offset.
    let wide = data([b, h, 3 * t, d], 11, kind);
    check_gather(&wide.narrow(2, 5, t), 7, 301);
    // A slice of head_dim: rows are strided, the last axis still has stride 1.
    let wide_d = data([b, h, t, 3 * d], 12, kind);
    check_gather(&wide_d.narrow(3, d, d), 4, 302);
    // Expanded over heads (stride 0), as grouped-query attention repeats kv heads.
    let one_head = data([b, 1, t, d], 13, kind);
    let x = one_head.expand([b, h, t, d], false);
    assert_eq!(x.stride()[1], 0);
    check_gather(&x, 5, 303);
    // Expanded along head_dim (stride 0 on the last axis) and a last axis of stride t.
    check_gather(
        &data([b, h, t, 1], 14, kind).expand([b, h, t, d], false),
        5,
        304,
    );
    check_gather(&data([b, h, d, t], 15, kind).transpose(2, 3), 9, 305);
    // Batch and heads permuted.
    check_gather(&data([h, b, t, d], 16, kind).permute([1, 0, 2, 3]), 3, 306);
}

#[test]
fn non_contiguous_f32_inputs() {
    check_layouts(Kind::Float);
}

#[test]
fn non_contiguous_f16_and_int32_inputs() {
    check_layouts(Kind::Half);
    check_layouts(Kind::Int);
}

#[test]
fn non_contiguous_bf16_inputs() {
    check_layouts(Kind::BFloat16);
}

#[test]
fn non_contiguous_indices() {
    let x = randn(&[2, 3, 10, 4], 50, Kind::Float);
    // One index row expanded over batch and heads.
    let row = [9i64, 0, 3, 3, 7];
    let indices = tensor_i64(&row, &[1, 1, 5]).expand([2, 3, 5], false);
    let idx: Vec<i64> = row.repeat(6);
    let out = gather_tokens(&x, &indices).unwrap();
    assert_eq!(
        values_f64(&out),
        reference_gather(&values_f64(&x), (2, 3, 10, 4), &idx, 5)
    );
    // Indices laid out (h, b, k) and transposed.
    let (idx_hbk, t_hbk) = random_indices(3, 2, 6, 10, 51);
    let indices = t_hbk.transpose(0, 1);
    let idx: Vec<i64> = values_i64(&indices);
    assert_ne!(idx, idx_hbk);
    let out = gather_tokens(&x, &indices).unwrap();
    assert_eq!(
        values_f64(&out),
        reference_gather(&values_f64(&x), (2, 3, 10, 4), &idx, 6)
    );
    assert!(out.equal(&gather_tokens_libtorch(&x, &indices).unwrap()));
}

#[test]
fn bf16_is_not_read_as_f16() {
    // tch 0.26 maps `half::bf16` to `Kind::Half`; a kernel typed through it would reject
    // bf16 tensors or treat their bits as f16. Values far outside f16's range catch both.
    let vals = [1.0e30, -3.0e-20, 65536.0 * 4.0, 1.5, -2.0e12, 7.0e-30];
    let x = tensor_f64(&vals, &[1, 1, 3, 2], Kind::BFloat16);
    let indices = tensor_i64(&[2, 0], &[1, 1, 2]);
    let out = gather_tokens(&x, &indices).unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    let exact = values_f64(&x);
    assert_eq!(values_f64(&out), [exact[4], exact[5], exact[0], exact[1]]);
    assert!((exact[0] / 1.0e30 - 1.0).abs() < 1e-2 && (exact[4] / -2.0e12 - 1.0).abs() < 1e-2);
    assert!(out.equal(&gather_tokens_libtorch(&x, &indices).unwrap()));
}

#[test]
fn empty_selection_gives_zero_tokens() {
    let x = randn(&[2, 3, 10, 4], 70, Kind::Float);
    let indices = Tensor::zeros([2, 3, 0], (Kind::Int64, CPU));
    let out = gather_tokens(&x, &indices).unwrap();
    assert_eq!(dims(&out), [2, 3, 0, 4]);
}

#[test]
fn invalid_indices_are_errors() {
    let x = randn(&[2, 3, 10, 4], 80, Kind::Float);
    let (mut idx, _) = random_indices(2, 3, 4, 10, 81);
    for bad in [10, 11, -1, i64::MAX, i64::MIN] {
        idx[13] = bad;
        let indices = tensor_i64(&idx, &[2, 3, 4]);
        let e = expect_err(gather_tokens(&x, &indices), "InvalidArgument");
        assert!(e.to_string().contains("indices"), "{e}");
        expect_err(gather_tokens_libtorch(&x, &indices), "InvalidArgument");
        // Rank-3 tensors too.
        let x3 = x.select(3, 0);
        expect_err(gather_tokens(&x3, &indices), "InvalidArgument");
    }
    idx[13] = 2;
    let good = tensor_i64(&idx, &[2, 3, 4]);
    assert_eq!(dims(&gather_tokens(&x, &good).unwrap()), [2, 3, 4, 4]);

    // Index dtype must be int64.
    for kind in [Kind::Int, Kind::Float, Kind::Int16] {
        expect_err(gather_tokens(&x, &good.to_kind(kind)), "Dtype");
    }
    // Batch or head mismatch, wrong index rank.
    expect_err(gather_tokens(&x, &good.narrow(0, 0, 1)), "Shape");
    expect_err(gather_tokens(&x, &good.narrow(1, 0, 2)), "Shape");
    expect_err(gather_tokens(&x, &good.reshape([6, 4])), "Shape");
    expect_err(gather_tokens(&x, &good.unsqueeze(-1)), "Shape");
    expect_err(gather_tokens(&x, &Tensor::cat(&[&good, &good], 0)), "Shape");
    // x of the wrong rank or of an unsupported dtype.
    expect_err(gather_tokens(&x.reshape([6, 40]), &good), "Shape");
    expect_err(gather_tokens(&x.unsqueeze(0), &good), "Shape");
    expect_err(gather_tokens(&x.to_kind(Kind::Double), &good), "Dtype");
    expect_err(gather_tokens(&x.to_kind(Kind::Bool), &good), "Dtype");
}

#[test]
fn cpu_kernel_on_ndarray_views() {
    let (b, h, t, d, k) = (2, 2, 6, 3, 4);
    let vals: Vec<f64> = (0..b * h * t * d).map(|i| i as f64).collect();
    let x = Array4::from_shape_vec((b, h, t, d), vals.clone()).unwrap();
    let (idx, _) = random_indices(b, h, k, t, 90);
    let indices = Array3::from_shape_vec((b, h, k), idx.clone()).unwrap();
    let mut out = vec![0.0f64; b * h * k * d];
    gather_tokens_cpu(x.view(), indices.view(), &mut out).unwrap();
    assert_eq!(out, reference_gather(&vals, (b, h, t, d), &idx, k));

    let mut short = vec![0.0f64; b * h * k * d - 1];
    expect_err(
        gather_tokens_cpu(x.view(), indices.view(), &mut short),
        "InvalidArgument",
    );
    let wrong = Array3::<i64>::zeros((b, h + 1, k));
    let mut out2 = vec![0.0f64; b * (h + 1) * k * d];
    expect_err(
        gather_tokens_cpu(x.view(), wrong.view(), &mut out2),
        "Shape",
    );
    let mut oob = indices.clone();
    oob[[1, 1, 2]] = t as i64;
    expect_err(
        gather_tokens_cpu(x.view(), oob.view(), &mut out),
        "InvalidArgument",
    );
    oob[[1, 1, 2]] = -1;
    expect_err(
        gather_tokens_cpu(x.view(), oob.view(), &mut out),
        "InvalidArgument",
    );
}
