//! The orthonormal Walsh–Hadamard rotation of a head vector (RotateKV's smoothing of
//! outlier channels before quantization).
//!
//! `H = H_d / √d` with the Sylvester matrix `H_d` (d a power of two) is symmetric and its
//! own inverse, so `q·k = (Hq)·(Hk)` and `Σ p_t v_t = H Σ p_t (H v_t)`: the cache stores
//! rotated keys and values, and attention rotates the query once and its output back.
//!
//! The fast transform runs log2(d) butterfly passes — pass `h = 1, 2, 4, …` maps each pair
//! (j, j+h) inside blocks of 2h to (a+b, a−b) — then multiplies by `1/√d` (an f32). The
//! libtorch path runs the same passes in the same order, so both produce identical bits.

use tch::Tensor;

/// `1/√d` as the f32 both paths multiply by.
#[inline(always)]
pub fn norm(d: usize) -> f32 {
    1.0 / (d as f32).sqrt()
}

/// Rotates `x` (length a power of two) in place.
#[inline(always)]
pub fn fwht(x: &mut [f32]) {
    let d = x.len();
    debug_assert!(d.is_power_of_two());
    let mut h = 1;
    while h < d {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (x0, x1) in a.iter_mut().zip(b.iter_mut()) {
                let (u, v) = (*x0, *x1);
                *x0 = u + v;
                *x1 = u - v;
            }
        }
        h *= 2;
    }
    let s = norm(d);
    for v in x.iter_mut() {
        *v *= s;
    }
}

/// The same rotation of each of the first `len` columns of a `d × stride` row-major
/// matrix (keys stored transposed: channel `c` of token `k` at `x[c * stride + k]`): the
/// butterflies pair whole channel rows, so every step runs over `len` contiguous tokens.
#[inline(always)]
pub fn fwht_columns(x: &mut [f32], d: usize, stride: usize, len: usize) {
    debug_assert!(d.is_power_of_two() && len <= stride && x.len() >= d * stride);
    let mut h = 1;
    while h < d {
        for start in (0..d).step_by(2 * h) {
            for c in start..start + h {
                let (lo, hi) = x.split_at_mut((c + h) * stride);
                let (a, b) = (&mut lo[c * stride..c * stride + len], &mut hi[..len]);
                for (x0, x1) in a.iter_mut().zip(b.iter_mut()) {
                    let (u, v) = (*x0, *x1);
                    *x0 = u + v;
                    *x1 = u - v;
                }
            }
        }
        h *= 2;
    }
    let s = norm(d);
    for row in x[..d * stride].chunks_exact_mut(stride) {
        for v in &mut row[..len] {
            *v *= s;
        }
    }
}

/// The same rotation over the last axis of an f32 tensor (any device).
pub fn fwht_tensor(x: &Tensor) -> crate::Result<Tensor> {
    let size = x.size();
    let d = *size.last().unwrap_or(&1);
    let lead: Vec<i64> = size[..size.len() - 1].to_vec();
    let mut y = x.f_contiguous()?;
    let mut h = 1;
    while h < d {
        let mut shape = lead.clone();
        shape.extend_from_slice(&[d / (2 * h), 2, h]);
        let v = y.f_view(shape.as_slice())?;
        let a = v.f_select(-2, 0)?;
        let b = v.f_select(-2, 1)?;
        y = Tensor::f_stack(&[a.f_add(&b)?, a.f_sub(&b)?], -2)?.f_view(size.as_slice())?;
        h *= 2;
    }
    Ok(y.f_mul_scalar(norm(d as usize) as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_orthonormal_and_involutive() {
        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        fwht(&mut y);
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-5);
        fwht(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn columns_of_a_transposed_matrix_rotate_like_rows() {
        let (d, stride, len) = (8, 5, 3);
        let x: Vec<f32> = (0..d * stride)
            .map(|i| ((i * 7 % 11) as f32) - 5.0)
            .collect();
        let mut cols = x.clone();
        fwht_columns(&mut cols, d, stride, len);
        for k in 0..stride {
            let mut row: Vec<f32> = (0..d).map(|c| x[c * stride + k]).collect();
            if k < len {
                fwht(&mut row);
            }
            for c in 0..d {
                assert!(
                    (cols[c * stride + k] - row[c]).abs() < 1e-5,
                    "column {k} channel {c}"
                );
            }
        }
    }

    #[test]
    fn first_row_is_the_normalised_sum() {
        let mut x = vec![1.0f32; 8];
        fwht(&mut x);
        assert!((x[0] - 8.0 / 8f32.sqrt()).abs() < 1e-6);
        assert!(x[1..].iter().all(|&v| v == 0.0));
    }
}
