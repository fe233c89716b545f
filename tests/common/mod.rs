//! Helpers shared by the integration tests: plain-Rust read-outs of tensors and references.
#![allow(dead_code)]

use kvpress_rs::KvError;
use tch::{Device, Kind, Tensor};

pub const CPU: Device = Device::Cpu;

/// The sizes of `t` as usize.
pub fn dims(t: &Tensor) -> Vec<usize> {
    t.size().iter().map(|&s| s as usize).collect()
}

/// Every element of `t` as f64, in logical row-major order, whatever its dtype and strides
/// (f32, f16, bf16 and small integers convert to f64 exactly).
pub fn values_f64(t: &Tensor) -> Vec<f64> {
    let flat = t.to_kind(Kind::Double).contiguous().reshape([-1]);
    Vec::<f64>::try_from(&flat).unwrap()
}

/// Every element of an integer tensor as i64, in logical row-major order.
pub fn values_i64(t: &Tensor) -> Vec<i64> {
    let flat = t.to_kind(Kind::Int64).contiguous().reshape([-1]);
    Vec::<i64>::try_from(&flat).unwrap()
}

/// A CPU tensor of the given shape from f64 values (converted to `kind`).
pub fn tensor_f64(values: &[f64], shape: &[i64], kind: Kind) -> Tensor {
    Tensor::from_slice(values).reshape(shape).to_kind(kind)
}

/// A CPU int64 tensor of the given shape.
pub fn tensor_i64(values: &[i64], shape: &[i64]) -> Tensor {
    Tensor::from_slice(values).reshape(shape)
}

/// The kept indices of one row by plain sorting: the `k` highest scores, ties to the
/// earlier token, returned in ascending token order.
pub fn reference_top_k(row: &[f64], k: usize) -> Vec<i64> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
    let mut kept: Vec<i64> = order[..k].iter().map(|&i| i as i64).collect();
    kept.sort_unstable();
    kept
}

/// `reference_top_k` over every (batch, head) row of flattened (rows, t) scores.
pub fn reference_top_k_rows(scores: &[f64], t: usize, k: usize) -> Vec<i64> {
    scores
        .chunks(t)
        .flat_map(|row| reference_top_k(row, k))
        .collect()
}

/// out[b, h, i, :] = x[b, h, idx[b, h, i], :] by nested loops over flattened data.
/// `x` is (b, h, t, d) row-major, `idx` is (b, h, k) row-major.
pub fn reference_gather(
    x: &[f64],
    (b, h, t, d): (usize, usize, usize, usize),
    idx: &[i64],
    k: usize,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(b * h * k * d);
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..k {
                let tok = idx[(bi * h + hi) * k + i] as usize;
                for di in 0..d {
                    out.push(x[((bi * h + hi) * t + tok) * d + di]);
                }
            }
        }
    }
    out
}

/// L2 norm of every (b, h, t) lane of a (b, h, t, d) row-major array, in f64.
pub fn norms_f64(x: &[f64], d: usize) -> Vec<f64> {
    x.chunks(d)
        .map(|lane| lane.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect()
}

/// Which variant an error is, for assertions.
pub fn variant(e: &KvError) -> &'static str {
    match e {
        KvError::InvalidArgument { .. } => "InvalidArgument",
        KvError::Shape { .. } => "Shape",
        KvError::Dtype { .. } => "Dtype",
        KvError::Device { .. } => "Device",
        KvError::NonFinite { .. } => "NonFinite",
        KvError::Empty { .. } => "Empty",
        KvError::State(_) => "State",
        KvError::Unsupported(_) => "Unsupported",
        KvError::UnsupportedModel(_) => "UnsupportedModel",
        KvError::Torch(_) => "Torch",
    }
}

/// Asserts that `r` is an error of the named variant and returns it.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(r: Result<T, KvError>, expected: &str) -> KvError {
    match r {
        Ok(v) => panic!("expected Err({expected}), got Ok({v:?})"),
        Err(e) => {
            assert_eq!(variant(&e), expected, "wrong error variant: {e}");
            e
        }
    }
}

/// A small deterministic generator (SplitMix64), so that test data does not depend on
/// libtorch's global RNG, which tests running in parallel threads would share.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn normals(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }

    /// A random permutation of 0..n (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i as u64 + 1) as usize);
        }
        p
    }
}

/// A CPU tensor of standard normal values (generated in f64, then converted to `kind`).
pub fn randn(shape: &[i64], seed: u64, kind: Kind) -> Tensor {
    let n: i64 = shape.iter().product();
    tensor_f64(&Rng::new(seed).normals(n as usize), shape, kind)
}
