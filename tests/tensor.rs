//! Tensor validation and zero-copy views: check_kv, check_finite, array_view, float_view.

mod common;

use common::*;
use kvpress_rs::tensor::{
    array_view, array_view_mut, check_finite, check_kv, check_kv_pair, float_view, FloatView,
    KvShape,
};
use ndarray::{Ix3, Ix4, IxDyn};
use tch::{Kind, Tensor};

#[test]
fn check_kv_accepts_float_kv_tensors() {
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        let t = randn(&[2, 3, 5, 8], 1, kind);
        assert_eq!(
            check_kv(&t, "keys").unwrap(),
            KvShape {
                batch: 2,
                heads: 3,
                tokens: 5,
                head_dim: 8
            }
        );
        // Non-contiguous layouts are fine; zero tokens too (an empty update is the caller's call).
        assert_eq!(
            check_kv(&t.transpose(1, 2).transpose(1, 2), "keys")
                .unwrap()
                .tokens,
            5
        );
        assert_eq!(check_kv(&t.narrow(2, 0, 0), "keys").unwrap().tokens, 0);
    }
    assert_eq!(
        KvShape {
            batch: 2,
            heads: 3,
            tokens: 5,
            head_dim: 8
        }
        .as_i64(),
        [2, 3, 5, 8]
    );
}

#[test]
fn check_kv_rejects_malformed_tensors() {
    let t = randn(&[2, 3, 5, 8], 2, Kind::Float);
    expect_err(check_kv(&Tensor::new(), "keys"), "InvalidArgument");
    expect_err(check_kv(&t.select(0, 0), "keys"), "Shape");
    expect_err(check_kv(&t.unsqueeze(0), "keys"), "Shape");
    for kind in [
        Kind::Double,
        Kind::Int,
        Kind::Int64,
        Kind::Bool,
        Kind::Uint8,
    ] {
        let e = expect_err(check_kv(&t.to_kind(kind), "values"), "Dtype");
        assert!(e.to_string().contains("values"), "{e}");
    }
    for (dim, _) in [(0, "batch"), (1, "heads"), (3, "head_dim")] {
        expect_err(check_kv(&t.narrow(dim, 0, 0), "keys"), "Shape");
    }
    let sparse = t.to_sparse(None::<tch::Layout>, None::<&[i64]>, None::<i64>);
    expect_err(check_kv(&sparse, "keys"), "InvalidArgument");
}

#[test]
fn check_kv_pair_requires_matching_rows_and_dtype() {
    let k = randn(&[2, 3, 5, 8], 3, Kind::Float);
    let v = randn(&[2, 3, 5, 4], 4, Kind::Float);
    let (ks, vs) = check_kv_pair(&k, &v).unwrap();
    assert_eq!((ks.head_dim, vs.head_dim), (8, 4));
    expect_err(check_kv_pair(&k, &v.narrow(2, 0, 4)), "Shape");
    expect_err(check_kv_pair(&k, &v.narrow(1, 0, 2)), "Shape");
    expect_err(check_kv_pair(&k, &v.narrow(0, 0, 1)), "Shape");
    expect_err(check_kv_pair(&k, &v.to_kind(Kind::BFloat16)), "Dtype");
}

#[test]
fn check_finite_finds_every_non_finite_value() {
    let shape = [2i64, 3, 7, 5];
    let n = 2 * 3 * 7 * 5;
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        let clean = randn(&shape, 5, kind);
        check_finite(&clean, "keys").unwrap();
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for pos in [0, 101, n - 1] {
                let mut v = values_f64(&clean);
                v[pos] = bad;
                let t = tensor_f64(&v, &shape, kind);
                let e = expect_err(check_finite(&t, "keys"), "NonFinite");
                assert!(e.to_string().contains("keys"), "{e}");
                // The same data seen through non-contiguous layouts.
                expect_err(check_finite(&t.transpose(1, 2), "keys"), "NonFinite");
                expect_err(check_finite(&t.permute([3, 2, 1, 0]), "keys"), "NonFinite");
            }
        }
        // A window that excludes the bad value is finite; one that includes it is not.
        let mut v = values_f64(&clean);
        v[(2 * 3 * 7 - 1) * 5] = f64::NAN; // last token of the last row
        let t = tensor_f64(&v, &shape, kind);
        check_finite(&t.narrow(2, 0, 6), "keys").unwrap();
        expect_err(check_finite(&t.narrow(2, 6, 1), "keys"), "NonFinite");
        // An expanded tensor repeating a NaN.
        let e = tensor_f64(&[1.0, f64::NAN], &[1, 1, 1, 2], kind).expand([2, 3, 4, 2], false);
        expect_err(check_finite(&e, "values"), "NonFinite");
        // Finite extremes are finite.
        let big = if kind == Kind::Half { 65504.0 } else { 1.0e38 };
        check_finite(
            &tensor_f64(&[big, -big, 0.0, -0.0], &[1, 1, 2, 2], kind),
            "keys",
        )
        .unwrap();
    }
    expect_err(
        check_finite(&Tensor::zeros([1, 1, 2, 2], (Kind::Double, CPU)), "keys"),
        "Dtype",
    );
}

#[test]
fn array_view_reads_through_strides_and_offsets() {
    let base = randn(&[2, 9, 3, 4], 6, Kind::Float);
    for t in [
        base.shallow_clone(),
        base.transpose(1, 2),
        base.narrow(1, 3, 5),
        base.permute([3, 1, 0, 2]),
        base.narrow(3, 1, 2).transpose(0, 3),
        base.narrow(0, 1, 1).expand([3, 9, 3, 4], false),
    ] {
        let view = array_view::<f32, Ix4>(&t, "x").unwrap();
        assert_eq!(view.shape(), dims(&t).as_slice());
        let got: Vec<f64> = view.iter().map(|&x| x as f64).collect();
        assert_eq!(got, values_f64(&t), "stride {:?}", t.stride());
    }
    // Integer views.
    let ints = tensor_f64(
        &(0..24).map(f64::from).collect::<Vec<_>>(),
        &[2, 3, 4],
        Kind::Int,
    );
    let transposed = ints.transpose(0, 2);
    let view = array_view::<i32, Ix3>(&transposed, "positions").unwrap();
    assert_eq!(
        view.iter().map(|&x| x as i64).collect::<Vec<_>>(),
        values_i64(&transposed)
    );
}

#[test]
fn array_view_checks_dtype_and_rank() {
    let t = randn(&[2, 3, 4], 7, Kind::Float);
    expect_err(array_view::<f32, Ix4>(&t, "x"), "Shape");
    expect_err(array_view::<i32, Ix3>(&t, "x"), "Dtype");
    expect_err(array_view::<half::f16, Ix3>(&t, "x"), "Dtype");
    // bf16 and f16 tensors are told apart.
    let bf = t.to_kind(Kind::BFloat16);
    expect_err(array_view::<half::f16, Ix3>(&bf, "x"), "Dtype");
    let v = array_view::<half::bf16, Ix3>(&bf, "x").unwrap();
    assert_eq!(
        v.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
        values_f64(&bf)
    );
    let h = t.to_kind(Kind::Half);
    expect_err(array_view::<half::bf16, Ix3>(&h, "x"), "Dtype");
    let v = array_view::<half::f16, Ix3>(&h, "x").unwrap();
    assert_eq!(
        v.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
        values_f64(&h)
    );
    assert_eq!(array_view::<f32, IxDyn>(&t, "x").unwrap().ndim(), 3);
}

#[test]
fn array_view_mut_writes_into_the_tensor_and_requires_contiguity() {
    let mut t = Tensor::zeros([2, 3, 4], (Kind::Float, CPU));
    {
        let mut view = array_view_mut::<f32, Ix3>(&mut t, "out").unwrap();
        view[[1, 2, 3]] = 5.0;
        view[[0, 1, 0]] = -1.5;
    }
    let v = values_f64(&t);
    assert_eq!((v[23], v[4]), (5.0, -1.5));
    assert_eq!(v.iter().filter(|&&x| x != 0.0).count(), 2);
    let mut tr = Tensor::zeros([4, 3, 2], (Kind::Float, CPU)).transpose(0, 2);
    expect_err(
        array_view_mut::<f32, Ix3>(&mut tr, "out"),
        "InvalidArgument",
    );
    let mut ints = Tensor::zeros([2, 3, 4], (Kind::Int64, CPU));
    expect_err(array_view_mut::<f32, Ix3>(&mut ints, "out"), "Dtype");
}

#[test]
fn float_view_picks_the_element_type() {
    let t = randn(&[1, 2, 3, 4], 8, Kind::Float);
    assert!(matches!(
        float_view::<Ix4>(&t, "k").unwrap(),
        FloatView::F32(_)
    ));
    assert!(matches!(
        float_view::<Ix4>(&t.to_kind(Kind::Half), "k").unwrap(),
        FloatView::F16(_)
    ));
    match float_view::<Ix4>(&t.to_kind(Kind::BFloat16), "k").unwrap() {
        FloatView::Bf16(v) => {
            let want = values_f64(&t.to_kind(Kind::BFloat16));
            assert_eq!(v.iter().map(|x| x.to_f64()).collect::<Vec<_>>(), want);
        }
        _ => panic!("bf16 must give a Bf16 view"),
    }
    assert_eq!(float_view::<Ix4>(&t, "k").unwrap().shape(), [1, 2, 3, 4]);
    expect_err(
        float_view::<Ix4>(&t.to_kind(Kind::Double), "k").map(|_| ()),
        "Dtype",
    );
    expect_err(
        float_view::<Ix4>(&t.to_kind(Kind::Int), "k").map(|_| ()),
        "Dtype",
    );
    expect_err(float_view::<Ix3>(&t, "k").map(|_| ()), "Shape");
}
