//! The leverage scorer against a reference written here from its definition (float64,
//! explicit inverse of the ridge-regularised Gram matrix, z-score over the layer), and on
//! crafted keys the token it must keep: the one that points where no other key does.

mod common;

use common::*;
use kvpress_rs::policies::{
    score_layer, scorer_from_name, ParamValue, Params, ScoreContext, Scorer,
};
use kvpress_rs::rope::{Rope, RopeSpec};
use kvpress_rs::select::top_k_indices;
use tch::{Device, Kind, Tensor};

fn leverage(ridge: f64) -> Box<dyn Scorer> {
    scorer_from_name(
        "leverage",
        Params::from_pairs([("ridge".to_string(), ParamValue::Float(ridge))]),
    )
    .unwrap()
}

fn positions(t: i64) -> Tensor {
    Tensor::arange(t, (Kind::Int64, Device::Cpu))
}

/// Scores of a prefill whose cached keys are `pre_keys` rotated at positions 0..T.
fn scores(s: &dyn Scorer, pre_keys: &Tensor, rope: &Rope) -> kvpress_rs::Result<Tensor> {
    let t = pre_keys.size()[2];
    let keys = rope.apply(pre_keys, &positions(t), None).unwrap();
    let values = Tensor::ones_like(&keys);
    score_layer(
        s,
        &keys,
        &values,
        None,
        Some(rope),
        &ScoreContext::prefill(0, 1),
    )
}

/// Per (row, head): X = pre-RoPE keys minus their mean over tokens, leverage of token i
/// = xᵢᵀ (XᵀX + ridge·I)⁻¹ xᵢ; then (l − mean) / std over the whole layer (unbiased std).
fn reference(pre_keys: &Tensor, ridge: f64) -> Vec<f64> {
    let [b, h, t, d] = dims(pre_keys)[..] else {
        unreachable!()
    };
    let x = values_f64(pre_keys);
    let mut out = Vec::with_capacity(b * h * t);
    for lane in x.chunks(t * d) {
        let mean: Vec<f64> = (0..d)
            .map(|c| (0..t).map(|i| lane[i * d + c]).sum::<f64>() / t as f64)
            .collect();
        let centred: Vec<f64> = (0..t * d).map(|j| lane[j] - mean[j % d]).collect();
        let mut gram = vec![0.0; d * d];
        for r in 0..d {
            for c in 0..d {
                gram[r * d + c] = (0..t)
                    .map(|i| centred[i * d + r] * centred[i * d + c])
                    .sum::<f64>()
                    + if r == c { ridge } else { 0.0 };
            }
        }
        let inverse = values_f64(&Tensor::linalg_inv(&tensor_f64(
            &gram,
            &[d as i64, d as i64],
            Kind::Double,
        )));
        for i in 0..t {
            let xi = &centred[i * d..(i + 1) * d];
            let l: f64 = (0..d)
                .map(|r| {
                    (0..d)
                        .map(|c| xi[r] * inverse[r * d + c] * xi[c])
                        .sum::<f64>()
                })
                .sum();
            out.push(l);
        }
    }
    let n = out.len() as f64;
    let mean = out.iter().sum::<f64>() / n;
    let std = (out.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    out.iter().map(|l| (l - mean) / std).collect()
}

#[test]
fn leverage_scores_match_the_reference() {
    let rope = Rope::new(RopeSpec::new(16, 10_000.0)).unwrap();
    for (seed, ridge, t) in [
        (1u64, 0.01, 48i64),
        (2, 1.0, 48),
        (3, 0.0, 64),
        (4, 0.01, 20),
    ] {
        let pre_keys = randn(&[2, 3, t, 16], seed, Kind::Float) * 2.0 + 0.3;
        let got = values_f64(&scores(leverage(ridge).as_ref(), &pre_keys, &rope).unwrap());
        let want = reference(&pre_keys, ridge);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-3 + 1e-3 * w.abs(),
                "seed {seed}, ridge {ridge}, t {t}: score {i} is {g}, want {w}"
            );
        }
    }
}

#[test]
fn leverage_keeps_the_key_that_points_where_no_other_does() {
    let rope = Rope::new(RopeSpec::new(16, 10_000.0)).unwrap();
    let t = 40;
    // every key spread over channels 0..8, small noise elsewhere; token 17 of head 1 alone
    // has a component along channel 12, yet its norm is ordinary
    let pre_keys = randn(&[1, 2, t, 16], 7, Kind::Float);
    let _ = pre_keys.narrow(3, 8, 8).multiply_scalar_(0.01);
    let outlier = pre_keys.narrow(1, 1, 1).narrow(2, 17, 1);
    let _ = outlier.narrow(3, 0, 8).multiply_scalar_(0.2);
    let _ = outlier.narrow(3, 12, 1).fill_(2.5);
    let s = scores(leverage(0.01).as_ref(), &pre_keys, &rope).unwrap();
    let kept = values_i64(&top_k_indices(&s, 1).unwrap());
    assert_eq!(kept[1], 17, "head 1 must keep token 17");
    // and it is not what the smallest or largest key norm would keep
    let norms = pre_keys
        .narrow(1, 1, 1)
        .norm_scalaropt_dim(2.0, [-1i64], false);
    let by_norm = [
        norms.argmin(-1, false).int64_value(&[]),
        norms.argmax(-1, false).int64_value(&[]),
    ];
    assert!(
        !by_norm.contains(&17),
        "the outlier must not be the norm extreme"
    );
}

#[test]
fn a_singular_gram_matrix_without_ridge_is_refused_naming_ridge() {
    let rope = Rope::new(RopeSpec::new(16, 10_000.0)).unwrap();
    let pre_keys = randn(&[1, 1, 30, 16], 9, Kind::Float);
    // channels 3 and 11 (one rotary pair) zero in every key: the Gram matrix has a zero row
    let _ = pre_keys.narrow(3, 3, 1).fill_(0.0);
    let _ = pre_keys.narrow(3, 11, 1).fill_(0.0);
    let err = scores(leverage(0.0).as_ref(), &pre_keys, &rope).unwrap_err();
    assert!(err.to_string().contains("ridge"), "{err}");
    // a ridge makes it well posed
    assert!(scores(leverage(0.01).as_ref(), &pre_keys, &rope).is_ok());
}

#[test]
fn leverage_refuses_to_score_during_generation_and_without_rope() {
    let rope = Rope::new(RopeSpec::new(16, 10_000.0)).unwrap();
    let keys = randn(&[1, 1, 10, 16], 11, Kind::Float);
    let ctx = ScoreContext {
        next_position: Some(25),
        ..ScoreContext::prefill(0, 1)
    };
    let s = leverage(0.01);
    let err = score_layer(s.as_ref(), &keys, &keys, None, Some(&rope), &ctx).unwrap_err();
    assert!(err.to_string().contains("leverage"), "{err}");
    let err = score_layer(
        s.as_ref(),
        &keys,
        &keys,
        None,
        None,
        &ScoreContext::prefill(0, 1),
    )
    .unwrap_err();
    assert!(err.to_string().contains("rope"), "{err}");
}
