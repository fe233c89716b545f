//! RoPE: frequencies of every rope type against hand-computed values, rotation identities,
//! CPU kernel vs libtorch path, precision at large positions, base bounds, errors.

mod common;

use common::*;
use kvpress_rs::rope::positions::broadcastable_positions;
use kvpress_rs::rope::rotate::{rotate_cpu, rotate_libtorch, Rotation};
use kvpress_rs::rope::{
    base_bounds, bounds::max_phase, Layout, Precision, Rope, RopeSpec, ScalingParams,
};
use kvpress_rs::tensor::check_kv;
use std::f64::consts::PI;
use tch::{Kind, Tensor};

fn spec(rope_type: &str, head_dim: usize, theta: f64, params: ScalingParams) -> RopeSpec {
    RopeSpec {
        rope_type: rope_type.to_owned(),
        params,
        ..RopeSpec::new(head_dim, theta)
    }
}

fn rope(rope_type: &str, head_dim: usize, theta: f64, params: ScalingParams) -> Rope {
    Rope::new(spec(rope_type, head_dim, theta, params)).unwrap()
}

#[track_caller]
fn assert_rel(got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs(),
            "element {i}: got {g}, want {w} ({got:?})"
        );
    }
}

#[track_caller]
fn assert_abs(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(worst <= tol, "max difference {worst:e} > {tol:e}");
}

#[test]
fn default_linear_and_dynamic_frequencies() {
    // head_dim 8, base 10^4: θ = 10^4^(−f/4) = 1, 0.1, 0.01, 0.001.
    let r = rope("default", 8, 1e4, ScalingParams::default());
    assert_rel(&r.inv_freq(None), &[1.0, 0.1, 0.01, 0.001], 1e-15);
    assert_eq!(r.attention_scaling(), 1.0);
    let linear = ScalingParams {
        factor: Some(4.0),
        ..Default::default()
    };
    let r = rope("linear", 8, 1e4, linear);
    assert_rel(
        &r.inv_freq(Some(10_000)),
        &[0.25, 0.025, 0.0025, 0.00025],
        1e-15,
    );
    // Dynamic NTK, factor 2, M = 100: unchanged up to M; at L = 200 the base becomes
    // 10^4 · (2·200/100 − 1)^(8/6) = 10^4 · 3^(4/3).
    let dynamic = ScalingParams {
        factor: Some(2.0),
        max_position_embeddings: Some(100),
        ..Default::default()
    };
    let r = rope("dynamic", 8, 1e4, dynamic);
    assert_rel(&r.inv_freq(None), &[1.0, 0.1, 0.01, 0.001], 1e-15);
    assert_rel(&r.inv_freq(Some(60)), &[1.0, 0.1, 0.01, 0.001], 1e-15);
    let grown: f64 = 1e4 * 3f64.powf(4.0 / 3.0);
    let want: Vec<f64> = (0..4).map(|f| grown.powf(-(f as f64) / 4.0)).collect();
    assert_rel(&r.inv_freq(Some(200)), &want, 1e-14);
    assert!(r.scaling().depends_on_seq_len());
}

#[test]
fn yarn_frequencies_and_attention_factor() {
    // head_dim 8, base 10^4, M0 = 2000, factor 4, beta_fast 32, beta_slow 1:
    // correction dim(r) = 8·ln(2000/(2πr)) / (2·ln 10^4):
    //   r = 32: 4·ln(9.947)/9.2103 = 0.9975 → floor 0;  r = 1: 4·ln(318.3)/9.2103 = 2.5034 → ceil 3.
    // ramp(f) = clamp(f/3): 0, 1/3, 2/3, 1 → θ_f·(1 − ramp) + θ_f/4·ramp.
    let params = ScalingParams {
        factor: Some(4.0),
        original_max_position_embeddings: Some(2000),
        ..Default::default()
    };
    let r = rope("yarn", 8, 1e4, params.clone());
    let theta = [1.0, 0.1, 0.01, 0.001];
    let want: Vec<f64> = (0..4)
        .map(|f| {
            let ramp = f as f64 / 3.0;
            theta[f] * (1.0 - ramp) + theta[f] / 4.0 * ramp
        })
        .collect();
    assert_rel(&r.inv_freq(None), &want, 1e-14);
    assert_rel(&[r.attention_scaling()], &[0.1 * 4f64.ln() + 1.0], 1e-15);
    // Without truncation the ramp runs between the exact correction dims.
    let (lo, hi) = (
        4.0 * (2000.0 / (64.0 * PI)).ln() / 1e4f64.ln(),
        4.0 * (2000.0 / (2.0 * PI)).ln() / 1e4f64.ln(),
    );
    let r = rope(
        "yarn",
        8,
        1e4,
        ScalingParams {
            truncate: Some(false),
            attention_factor: Some(1.5),
            ..params.clone()
        },
    );
    let want: Vec<f64> = (0..4)
        .map(|f| {
            let ramp = ((f as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
            theta[f] * (1.0 - ramp) + theta[f] / 4.0 * ramp
        })
        .collect();
    assert_rel(&r.inv_freq(None), &want, 1e-14);
    assert_eq!(r.attention_scaling(), 1.5);
    // mscale / mscale_all_dim: (0.1·m·ln s + 1) / (0.1·m_all·ln s + 1).
    let r = rope(
        "yarn",
        8,
        1e4,
        ScalingParams {
            mscale: Some(0.5),
            mscale_all_dim: Some(2.0),
            ..params.clone()
        },
    );
    let l = 4f64.ln();
    assert_rel(
        &[r.attention_scaling()],
        &[(0.05 * l + 1.0) / (0.2 * l + 1.0)],
        1e-15,
    );
    // factor defaults to max / original context.
    let r = rope(
        "yarn",
        8,
        1e4,
        ScalingParams {
            factor: None,
            max_position_embeddings: Some(8000),
            ..params
        },
    );
    assert_rel(&r.inv_freq(None), &want_yarn_default(), 1e-14);
}

/// The truncated yarn frequencies of the test above (factor 8000/2000 = 4).
fn want_yarn_default() -> Vec<f64> {
    let theta = [1.0, 0.1, 0.01, 0.001];
    (0..4)
        .map(|f| {
            let ramp = f as f64 / 3.0;
            theta[f] * (1.0 - ramp) + theta[f] / 4.0 * ramp
        })
        .collect()
}

#[test]
fn llama3_frequencies_in_three_bands() {
    // head_dim 8, base 10^4: wavelengths 2π/θ = 6.28, 62.8, 628, 6283. M0 = 1000,
    // low 1 → 1000, high 4 → 250: f = 0, 1 kept; f = 3 divided by 8; f = 2 smoothed with
    // s = (1000/628.3 − 1)/3.
    let r = rope(
        "llama3",
        8,
        1e4,
        ScalingParams {
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(1000),
            ..Default::default()
        },
    );
    let s = (1000.0 / (2.0 * PI / 0.01) - 1.0) / 3.0;
    let want = [1.0, 0.1, (1.0 - s) * 0.01 / 8.0 + s * 0.01, 0.001 / 8.0];
    assert_rel(&r.inv_freq(None), &want, 1e-14);
}

#[test]
fn longrope_picks_factors_by_length() {
    let params = ScalingParams {
        short_factor: Some(vec![1.0, 2.0, 3.0, 4.0]),
        long_factor: Some(vec![5.0, 6.0, 7.0, 8.0]),
        original_max_position_embeddings: Some(1024),
        max_position_embeddings: Some(4096),
        ..Default::default()
    };
    let r = rope("longrope", 8, 1e4, params.clone());
    let theta = [1.0, 0.1, 0.01, 0.001];
    let short: Vec<f64> = (0..4).map(|f| theta[f] / (f as f64 + 1.0)).collect();
    let long: Vec<f64> = (0..4).map(|f| theta[f] / (f as f64 + 5.0)).collect();
    assert_rel(&r.inv_freq(None), &short, 1e-15);
    assert_rel(&r.inv_freq(Some(1024)), &short, 1e-15);
    assert_rel(&r.inv_freq(Some(1025)), &long, 1e-15);
    // factor = 4096/1024 = 4 → √(1 + ln 4 / ln 1024) = √1.2.
    assert_rel(&[r.attention_scaling()], &[1.2f64.sqrt()], 1e-15);
    let r = rope(
        "longrope",
        8,
        1e4,
        ScalingParams {
            factor: Some(1.0),
            ..params
        },
    );
    assert_eq!(r.attention_scaling(), 1.0);
}

#[test]
fn partial_rotary_dimensions() {
    let r = Rope::new(RopeSpec {
        partial_rotary_factor: 0.25,
        ..RopeSpec::new(32, 1e4)
    })
    .unwrap();
    assert_eq!((r.head_dim(), r.rotary_dim()), (32, 8));
    // Frequencies are those of an 8-channel rotation.
    assert_rel(&r.inv_freq(None), &[1.0, 0.1, 0.01, 0.001], 1e-15);
    let r = Rope::new(RopeSpec {
        rotary_dim: Some(12),
        ..RopeSpec::new(32, 1e4)
    })
    .unwrap();
    assert_eq!(r.rotary_dim(), 12);
}

/// x of shape (b, h, t, d) with a distinct random vector per row.
fn keys(shape: [i64; 4], seed: u64, kind: Kind) -> Tensor {
    randn(&shape, seed, kind)
}

fn ropes() -> Vec<Rope> {
    let mut out = Vec::new();
    for layout in [Layout::RotateHalf, Layout::Interleaved] {
        for (rope_type, params) in [
            ("default", ScalingParams::default()),
            (
                "yarn",
                ScalingParams {
                    factor: Some(8.0),
                    original_max_position_embeddings: Some(64),
                    ..Default::default()
                },
            ),
            (
                "longrope",
                ScalingParams {
                    short_factor: Some(vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5]),
                    long_factor: Some(vec![2.0; 6]),
                    original_max_position_embeddings: Some(64),
                    max_position_embeddings: Some(512),
                    ..Default::default()
                },
            ),
        ] {
            out.push(
                Rope::new(RopeSpec {
                    layout,
                    rotary_dim: Some(12),
                    ..spec(rope_type, 16, 1e4, params)
                })
                .unwrap(),
            );
        }
    }
    out
}

#[test]
fn apply_rotates_unit_vectors_by_the_angle() {
    // e_0 at position p becomes cos(pθ_0)·e_0 + sin(pθ_0)·e_partner, times the scaling.
    for r in ropes() {
        let f = r.rotary_dim() / 2;
        let partner = match r.layout() {
            Layout::RotateHalf => f,
            Layout::Interleaved => 1,
        };
        let mut e = vec![0.0; 16];
        e[0] = 1.0;
        let x = tensor_f64(&e, &[1, 1, 1, 16], Kind::Float);
        for p in [0i64, 1, 7, 1000, -3, 123_456_789] {
            let y = values_f64(&r.apply(&x, &Tensor::from(p), None).unwrap());
            let a = p as f64 * r.inv_freq(None)[0];
            let s = r.attention_scaling();
            let mut want = vec![0.0; 16];
            want[0] = s * a.cos();
            want[partner] = s * a.sin();
            assert_abs(&y, &want, 2e-7);
        }
    }
}

#[test]
fn invert_and_shift_identities_in_f32() {
    for (i, r) in ropes().into_iter().enumerate() {
        let x = keys([2, 3, 17, 16], 10 + i as u64, Kind::Float);
        let p = Tensor::from_slice(
            &Rng::new(i as u64)
                .normals(2 * 3 * 17)
                .iter()
                .map(|v| (v.abs() * 10_000.0) as i64)
                .collect::<Vec<_>>(),
        )
        .reshape([2, 3, 17]);
        let d = &p.remainder(977) - 400;
        for seq_len in [None, Some(1000)] {
            let y = r.apply(&x, &p, seq_len).unwrap();
            assert_abs(
                &values_f64(&r.invert(&y, &p, seq_len).unwrap()),
                &values_f64(&x),
                1e-6,
            );
            let moved = r.shift(&y, &d, seq_len).unwrap();
            let direct = r.apply(&x, &(&p + &d), seq_len).unwrap();
            assert_abs(&values_f64(&moved), &values_f64(&direct), 1e-6);
            let back = r.shift(&moved, &(-&d), seq_len).unwrap();
            assert_abs(&values_f64(&back), &values_f64(&y), 1e-6);
            // The channels past rotary_dim are copied.
            assert!(moved.narrow(3, 12, 4).equal(&y.narrow(3, 12, 4)));
        }
    }
}

#[test]
fn shift_is_a_rotation_and_composes() {
    let r = &ropes()[1]; // yarn: attention scaling ≠ 1 must not enter a shift
    assert!(r.attention_scaling() > 1.0);
    let x = keys([1, 2, 9, 16], 3, Kind::Float);
    let a = r.shift(&x, &Tensor::from(300i64), None).unwrap();
    let ab = r.shift(&a, &Tensor::from(-1234i64), None).unwrap();
    let direct = r.shift(&x, &Tensor::from(-934i64), None).unwrap();
    assert_abs(&values_f64(&ab), &values_f64(&direct), 1e-6);
    let norms = |t: &Tensor| norms_f64(&values_f64(t), 16);
    assert_rel(&norms(&a), &norms(&x), 1e-6);
}

#[test]
fn cpu_kernel_and_libtorch_path_agree() {
    for (i, r) in ropes().into_iter().enumerate() {
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            let x = keys([2, 3, 11, 16], 40 + i as u64, kind);
            // A non-contiguous view: (b, t, h, d) transposed.
            let xt = keys([2, 11, 3, 16], 50 + i as u64, kind).transpose(1, 2);
            let shape = check_kv(&x, "x").unwrap();
            for positions in [
                Tensor::from(123_457i64),
                Tensor::arange(11, (Kind::Int64, CPU)) * 97,
                Tensor::arange(66, (Kind::Int64, CPU)).reshape([2, 3, 11]) * 10_007 - 5000,
            ] {
                let pos = broadcastable_positions(&positions, shape, "positions").unwrap();
                let inv = r.inv_freq(None);
                for (sign, scale) in [(1.0, r.attention_scaling()), (-1.0, 0.5), (1.0, 1.0)] {
                    let rot = Rotation {
                        inv_freq: &inv,
                        sign,
                        scale,
                        layout: r.layout(),
                    };
                    for input in [&x, &xt] {
                        let cpu = rotate_cpu(input, &pos, &rot, false).unwrap();
                        let lt = rotate_libtorch(input, &pos, &rot, false).unwrap();
                        assert_eq!(cpu.kind(), kind);
                        assert_eq!(lt.kind(), kind);
                        let tol = match kind {
                            Kind::Float => 1e-6,
                            _ => 2.0 * 2f64.powi(-8) * 4.0, // one rounding of values up to 4
                        };
                        assert_abs(&values_f64(&cpu), &values_f64(&lt), tol);
                        // float32 out: the same rotation unrounded (both paths compute
                        // halves in float32), and rounding it gives the dtype's result
                        let cpu32 = rotate_cpu(input, &pos, &rot, true).unwrap();
                        let lt32 = rotate_libtorch(input, &pos, &rot, true).unwrap();
                        assert_eq!((cpu32.kind(), lt32.kind()), (Kind::Float, Kind::Float));
                        assert_abs(&values_f64(&cpu32), &values_f64(&lt32), 1e-5);
                        assert_eq!(values_f64(&cpu32.to_kind(kind)), values_f64(&cpu));
                    }
                }
            }
        }
    }
}

#[test]
fn cos_sin_layout_and_values() {
    for r in ropes() {
        let p = Tensor::from_slice(&[0i64, 5, 1_000_000]).reshape([3, 1]);
        let (c, s) = r.cos_sin(&p, None).unwrap();
        assert_eq!(c.size(), [3, 1, 12]);
        assert_eq!(c.kind(), Kind::Float);
        let (c, s) = (values_f64(&c), values_f64(&s));
        let inv = r.inv_freq(None);
        for (row, pos) in [0.0, 5.0, 1e6].iter().enumerate() {
            for j in 0..12 {
                let f = match r.layout() {
                    Layout::RotateHalf => j % 6,
                    Layout::Interleaved => j / 2,
                };
                let a = pos * inv[f];
                let k = row * 12 + j;
                assert!((c[k] - r.attention_scaling() * a.cos()).abs() < 2e-7);
                assert!((s[k] - r.attention_scaling() * a.sin()).abs() < 2e-7);
            }
        }
    }
}

#[test]
fn bf16_shift_far_away_keeps_exact_angles() {
    // A chunk encoded at 0..31 in bf16 then moved by 10^6: the result equals the f64 rotation
    // to within bf16 rounding, at every channel, fast or slow.
    let r = Rope::new(RopeSpec::new(32, 1e6)).unwrap();
    let xb = keys([1, 2, 32, 32], 9, Kind::BFloat16);
    let local = Tensor::arange(32, (Kind::Int64, CPU));
    let cached = r.apply(&xb, &local, None).unwrap();
    let moved = r.shift(&cached, &Tensor::from(1_000_000i64), None).unwrap();
    // Reference: the f64 rotation of the same bf16 keys at local + 10^6, from the textbook
    // formula; two bf16 roundings (cached, moved) separate it from ours.
    let x = values_f64(&xb);
    let inv: Vec<f64> = (0..16).map(|f| 1e6f64.powf(-(f as f64) / 16.0)).collect();
    let mut want = vec![0.0; x.len()];
    for row in 0..64 {
        let p = (row % 32) as f64 + 1e6;
        for f in 0..16 {
            let (a, b) = (x[row * 32 + f], x[row * 32 + f + 16]);
            let (sn, cs) = (p * inv[f]).sin_cos();
            want[row * 32 + f] = a * cs - b * sn;
            want[row * 32 + f + 16] = b * cs + a * sn;
        }
    }
    let got = values_f64(&moved);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let pair = (x[i - i % 32 + i % 16].powi(2) + x[i - i % 32 + i % 16 + 16].powi(2)).sqrt();
        assert!(
            (g - w).abs() <= 2.0 * 2f64.powi(-8) * pair + 1e-6,
            "element {i}: {g} vs {w}"
        );
    }
}

#[test]
fn positions_shapes_and_errors() {
    let r = Rope::new(RopeSpec::new(8, 1e4)).unwrap();
    let x = keys([2, 3, 5, 8], 1, Kind::Float);
    let p = Tensor::arange(5, (Kind::Int64, CPU));
    let want = r.apply(&x, &p, None).unwrap();
    for q in [
        p.unsqueeze(0).expand([2, 5], false),
        p.view([1, 1, 5]).expand([2, 3, 5], false),
        p.to_kind(Kind::Int),
    ] {
        assert!(r.apply(&x, &q, None).unwrap().equal(&want));
    }
    expect_err(
        r.apply(&x, &Tensor::arange(6, (Kind::Int64, CPU)), None),
        "Shape",
    );
    expect_err(
        r.apply(&x, &Tensor::zeros([2, 2, 5], (Kind::Int64, CPU)), None),
        "Shape",
    );
    expect_err(
        r.apply(&x, &Tensor::zeros([1, 1, 1, 5], (Kind::Int64, CPU)), None),
        "Shape",
    );
    expect_err(r.apply(&x, &p.to_kind(Kind::Float), None), "Dtype");
    expect_err(r.apply(&x, &p.to_kind(Kind::Bool), None), "Dtype");
    expect_err(r.apply(&x.select(0, 0), &p, None), "Shape");
    expect_err(
        r.apply(&keys([2, 3, 5, 16], 1, Kind::Float), &p, None),
        "Shape",
    );
    expect_err(r.apply(&x.to_kind(Kind::Double), &p, None), "Dtype");
    expect_err(r.cos_sin(&p.to_kind(Kind::Float), None), "Dtype");
    // Positions whose angle is beyond float64 integer exactness are refused.
    let far = Tensor::from(1i64 << 60);
    expect_err(r.apply(&x, &far, None), "InvalidArgument");
    expect_err(r.shift(&x, &(-&far), None), "InvalidArgument");
    expect_err(r.cos_sin(&far, None), "InvalidArgument");
    // Zero tokens are fine.
    let empty = keys([2, 3, 0, 8], 1, Kind::Float);
    let out = r
        .apply(&empty, &Tensor::arange(0, (Kind::Int64, CPU)), None)
        .unwrap();
    assert_eq!(out.size(), [2, 3, 0, 8]);
}

#[test]
fn bad_specs_are_invalid_arguments() {
    let cases: Vec<(RopeSpec, &str)> = vec![
        (spec("ntk", 8, 1e4, ScalingParams::default()), "rope_type"),
        (spec("linear", 8, 1e4, ScalingParams::default()), "factor"),
        (
            spec(
                "dynamic",
                8,
                1e4,
                ScalingParams {
                    factor: Some(2.0),
                    ..Default::default()
                },
            ),
            "max_position_embeddings",
        ),
        (
            spec(
                "yarn",
                8,
                1e4,
                ScalingParams {
                    factor: Some(2.0),
                    ..Default::default()
                },
            ),
            "original_max_position_embeddings",
        ),
        (
            spec(
                "llama3",
                8,
                1e4,
                ScalingParams {
                    factor: Some(8.0),
                    original_max_position_embeddings: Some(10),
                    low_freq_factor: Some(4.0),
                    high_freq_factor: Some(1.0),
                    ..Default::default()
                },
            ),
            "high_freq_factor",
        ),
        (
            spec(
                "longrope",
                8,
                1e4,
                ScalingParams {
                    short_factor: Some(vec![1.0; 3]),
                    long_factor: Some(vec![1.0; 4]),
                    max_position_embeddings: Some(10),
                    ..Default::default()
                },
            ),
            "short_factor",
        ),
        (
            spec(
                "linear",
                8,
                1e4,
                ScalingParams {
                    factor: Some(-2.0),
                    ..Default::default()
                },
            ),
            "factor",
        ),
        (RopeSpec::new(7, 1e4), "head_dim"),
        (
            RopeSpec {
                partial_rotary_factor: 0.3,
                ..RopeSpec::new(10, 1e4)
            },
            "rotary_dim",
        ),
        (
            RopeSpec {
                partial_rotary_factor: 1.5,
                ..RopeSpec::new(8, 1e4)
            },
            "partial_rotary_factor",
        ),
        (
            RopeSpec {
                rotary_dim: Some(10),
                ..RopeSpec::new(8, 1e4)
            },
            "rotary_dim",
        ),
        (RopeSpec::new(8, 0.0), "theta"),
        (RopeSpec::new(8, f64::NAN), "theta"),
    ];
    for (s, argument) in cases {
        let e = expect_err(Rope::new(s.clone()), "InvalidArgument");
        assert!(e.to_string().contains(argument), "{s:?}: {e}");
    }
}

#[test]
fn base_bounds_formulas() {
    let d = 128.0;
    let b = base_bounds(128, 4096, 32, Precision::F32).unwrap();
    assert_rel(
        &[b.aliasing],
        &[(4096.0 / (2.0 * PI)).powf(d / (d - 2.0))],
        1e-12,
    );
    assert_rel(&[b.precision], &[2f64.powf(24.0 * d / (d - 2.0))], 1e-12);
    assert_rel(
        &[b.stability],
        &[(4096.0 / b.max_phase).powf(d / (d - 2.0))],
        1e-12,
    );
    // Φ_N: D(Φ_N)^N = 2/π, with Φ_1 = π and Φ_N → √(24 ln(π/2) / N) for large N.
    assert_rel(&[max_phase(1)], &[PI], 1e-12);
    for n in [2usize, 32, 80, 1000] {
        let phi = max_phase(n);
        let dc = (phi / 2.0).sin() / (phi / 2.0);
        assert_rel(&[dc.powi(n as i32)], &[2.0 / PI], 1e-9);
    }
    assert_rel(
        &[max_phase(1000)],
        &[(24.0 * (PI / 2.0).ln() / 1000.0).sqrt()],
        1e-3,
    );
    // Published configurations lie inside their region (phases in f32).
    for (dim, theta, ctx, depth) in [
        (128, 1e4, 4096, 32),
        (128, 5e5, 8192, 32),
        (128, 1e6, 32768, 32),
        (128, 1e6, 32768, 28),
        (64, 1e5, 8192, 30),
    ] {
        let b = base_bounds(dim, ctx, depth, Precision::F32).unwrap();
        assert!(b.contains(theta), "{dim} {theta} {ctx} {depth}: {b:?}");
        assert!(base_bounds(dim, ctx, depth, Precision::Bf16)
            .unwrap()
            .is_empty());
    }
    assert!(!base_bounds(128, 131_072, 32, Precision::F32)
        .unwrap()
        .contains(10.0));
    expect_err(base_bounds(2, 4096, 32, Precision::F32), "InvalidArgument");
    expect_err(base_bounds(128, 0, 32, Precision::F32), "InvalidArgument");
    expect_err(base_bounds(128, 4096, 0, Precision::F32), "InvalidArgument");
    expect_err(Precision::from_name("int8"), "InvalidArgument");
    assert_eq!(
        Precision::from_name("torch.bfloat16").unwrap(),
        Precision::Bf16
    );
}
