//! Top-k selection: which token indices each (batch, head) row keeps, given scores.
//!
//! Indices come back in ascending order (original token order), so kept positions stay
//! sorted and a gather preserves the order of the sequence. Ties are broken towards the
//! earlier token, on every device, so results do not depend on the sort implementation.

use crate::error::{KvError, Result};
use crate::tensor::{array_view, array_view_mut, uses_cpu_kernels};
use ndarray::{ArrayView3, ArrayViewMut3, Axis};
use rayon::prelude::*;
use std::cmp::Ordering;
use tch::{Device, Kind, Tensor};

/// Kept indices for scores of shape (batch, heads, tokens): the `k` highest per row,
/// returned as int64 (batch, heads, k) in ascending order.
///
/// CPU tensors use the parallel Rust kernel; other devices a stable libtorch sort.
pub fn top_k_indices(scores: &Tensor, k: usize) -> Result<Tensor> {
    let size = check_selection(scores, k)?;
    if uses_cpu_kernels(scores) {
        let mut out = Tensor::f_empty([size[0], size[1], k as i64], (Kind::Int64, Device::Cpu))?;
        let dst = array_view_mut(&mut out, "indices")?;
        if matches!(scores.f_kind()?, Kind::Float | Kind::BFloat16 | Kind::Half) {
            // float32 holds bf16 and f16 values exactly
            let wide = scores.f_to_kind(Kind::Float)?;
            top_k_indices_f32(array_view::<f32, ndarray::Ix3>(&wide, "scores")?, dst)?;
        } else {
            // f64 holds every other dtype's values exactly (int64 up to 2^53): no ranking
            // changes from rounding.
            let wide = scores.f_to_kind(Kind::Double)?;
            top_k_indices_cpu(array_view::<f64, ndarray::Ix3>(&wide, "scores")?, dst)?;
        }
        Ok(out)
    } else {
        top_k_indices_libtorch(scores, k)
    }
}

/// The size of `scores` (batch, heads, tokens), after checking that a selection of `k`
/// tokens per row can be made from it (every selector's precondition).
pub(crate) fn check_selection(scores: &Tensor, k: usize) -> Result<Vec<i64>> {
    let size = scores.size();
    if size.len() != 3 {
        return Err(KvError::shape(
            "scores",
            &size,
            "rank 3: (batch, heads, tokens)",
        ));
    }
    let n_tokens = size[2] as usize;
    if k == 0 || k > n_tokens {
        return Err(KvError::invalid(
            "k",
            format!("got {k}, expected 1 <= k <= {n_tokens} (tokens)"),
        ));
    }
    Ok(size)
}

/// The libtorch path of [`top_k_indices`], usable on any device (tests run it on CPU to
/// check it against the Rust kernel).
pub fn top_k_indices_libtorch(scores: &Tensor, k: usize) -> Result<Tensor> {
    if scores.f_isnan()?.f_any()?.f_int64_value(&[])? != 0 {
        return Err(KvError::non_finite("scores", "a scorer produced NaN"));
    }
    // A stable descending sort keeps equal scores in index order: ties go to earlier tokens.
    let order = scores.f_argsort_stable(true, -1, true)?;
    let (sorted, _) = order
        .f_narrow(-1, 0, k as i64)?
        .f_sort_stable(true, -1, false)?;
    Ok(sorted)
}

/// A score element the CPU selection kernel ranks.
pub trait ScoreValue: Copy + PartialOrd + Send + Sync {
    fn is_nan(self) -> bool;
}

impl ScoreValue for f32 {
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl ScoreValue for f64 {
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// The checks both CPU selection kernels share: `out` is (batch, heads, k) with
/// 1 <= k <= T and contiguous, and no score is NaN (a NaN has no rank).
fn checked_output<'a, S: ScoreValue>(
    scores: &ArrayView3<'_, S>,
    out: &'a mut ArrayViewMut3<'_, i64>,
) -> Result<&'a mut [i64]> {
    let (b, h, t) = scores.dim();
    let (ob, oh, k) = out.dim();
    if ob != b || oh != h || k == 0 || k > t {
        return Err(KvError::shape(
            "indices",
            &[ob as i64, oh as i64, k as i64],
            format!("({b}, {h}, k) with 1 <= k <= {t}"),
        ));
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(KvError::non_finite("scores", "a scorer produced NaN"));
    }
    out.as_slice_mut()
        .ok_or_else(|| KvError::invalid("indices", "the output must be contiguous"))
}

/// [`top_k_indices_cpu`] for float32 scores, with the same result: each (score, index)
/// pair becomes one u64 key whose ascending order is higher score first, then earlier
/// token, so that the selection compares integers instead of calling a comparator through
/// the view, and the kept indices come back in order from a bitmap instead of a sort.
pub fn top_k_indices_f32(
    scores: ArrayView3<'_, f32>,
    mut out: ArrayViewMut3<'_, i64>,
) -> Result<()> {
    let (_, h, t) = scores.dim();
    let k = out.dim().2;
    if t > u32::MAX as usize {
        return Err(KvError::invalid(
            "scores",
            format!(
                "got {t} tokens, expected at most {} (u32 indices)",
                u32::MAX
            ),
        ));
    }
    let out = checked_output(&scores, &mut out)?;
    out.par_chunks_mut(k).enumerate().for_each_init(
        || (Vec::with_capacity(t), vec![false; t]),
        |(keys, kept): &mut (Vec<u64>, Vec<bool>), (row_idx, dst)| {
            let row = scores.index_axis(Axis(0), row_idx / h);
            let row = row.index_axis(Axis(0), row_idx % h);
            keys.clear();
            keys.extend(row.iter().enumerate().map(|(i, &x)| {
                // +0.0 for −0.0 (they tie), then the bits ordered like the floats:
                // negative ones reversed, positive ones above them
                let bits = (x + 0.0).to_bits();
                let ordered = if bits >> 31 == 1 {
                    !bits
                } else {
                    bits | 1 << 31
                };
                (u64::from(!ordered) << 32) | i as u64
            }));
            if k < t {
                keys.select_nth_unstable(k - 1);
            }
            kept.fill(false);
            for &key in &keys[..k] {
                kept[(key & 0xffff_ffff) as usize] = true;
            }
            let mut slots = dst.iter_mut();
            for (i, _) in kept.iter().enumerate().filter(|(_, &on)| on) {
                if let Some(d) = slots.next() {
                    *d = i as i64;
                }
            }
        },
    );
    Ok(())
}

/// The CPU kernel of [`top_k_indices`]: rows in parallel, O(T) selection then a sort of
/// the k kept indices.
pub fn top_k_indices_cpu<S: ScoreValue>(
    scores: ArrayView3<'_, S>,
    mut out: ArrayViewMut3<'_, i64>,
) -> Result<()> {
    let (_, h, t) = scores.dim();
    let k = out.dim().2;
    let out = checked_output(&scores, &mut out)?;
    out.par_chunks_mut(k).enumerate().for_each_init(
        || Vec::with_capacity(t),
        |order: &mut Vec<usize>, (row_idx, dst)| {
            let (i, j) = (row_idx / h, row_idx % h);
            let row = scores.index_axis(Axis(0), i);
            let row = row.index_axis(Axis(0), j);
            order.clear();
            order.extend(0..t);
            // Higher score first; among equal scores, the earlier token first.
            let better = |a: &usize, c: &usize| -> Ordering {
                row[*c]
                    .partial_cmp(&row[*a])
                    .unwrap_or(Ordering::Equal)
                    .then(a.cmp(c))
            };
            if k < t {
                order.select_nth_unstable_by(k - 1, better);
            }
            order.truncate(k);
            order.sort_unstable();
            for (d, &s) in dst.iter_mut().zip(order.iter()) {
                *d = s as i64;
            }
        },
    );
    Ok(())
}

/// AdaKV's split of a layer's budget among its heads, per batch row: every head keeps its
/// top `max(1, int(n_kept * alpha))` tokens (the safeguard, when alpha > 0), and the rest
/// of the layer's `kv_heads * n_kept` tokens go to the highest remaining scores across all
/// its heads (ties to the lower head, then the earlier token). `scores` (batch, kv_heads,
/// tokens). Returns one int64 (k_r,) ascending index vector per row r = b * kv_heads + h,
/// on the CPU; the counts sum to kv_heads * n_kept per batch row.
pub fn adakv_rows(scores: &Tensor, n_kept: usize, alpha: f64) -> Result<Vec<Tensor>> {
    let size = scores.size();
    if size.len() != 3 {
        return Err(KvError::shape(
            "scores",
            &size,
            "rank 3: (batch, heads, tokens)",
        ));
    }
    let (batch, heads, t) = (size[0], size[1], size[2]);
    if n_kept == 0 || n_kept as i64 > t {
        return Err(KvError::invalid(
            "n_kept",
            format!("got {n_kept}, expected 1 <= n_kept <= {t}"),
        ));
    }
    // f64 holds every score dtype exactly: no ranking changes from rounding.
    let wide = scores
        .f_to(Device::Cpu)?
        .f_to_kind(Kind::Double)?
        .f_contiguous()?;
    let view = array_view::<f64, ndarray::Ix3>(&wide, "scores")?;
    let all = view
        .as_slice()
        .ok_or_else(|| KvError::invalid("scores", "expected contiguous scores"))?;
    if all.iter().any(|s| s.is_nan()) {
        return Err(KvError::non_finite("scores", "a scorer produced NaN"));
    }
    let mut n_safe = (n_kept as f64 * alpha) as usize;
    if alpha > 0.0 {
        n_safe = n_safe.max(1);
    }
    let (heads, t) = (heads as usize, t as usize);
    let per_batch: Vec<Vec<Vec<i64>>> = all
        .par_chunks(heads * t)
        .map(|flat| adakv_batch_row(flat, heads, n_kept, n_safe))
        .collect();
    let mut rows = Vec::with_capacity(batch as usize * heads);
    for per_head in per_batch {
        for idx in per_head {
            rows.push(Tensor::f_from_slice(&idx)?);
        }
    }
    Ok(rows)
}

/// One batch row of [`adakv_rows`]: `flat` holds the (heads, t) scores head after head.
/// Each head's top `n_safe` (ties to the earlier token) count as +inf; then the best
/// `heads * n_kept` of all, higher first and ties to the lower flat index (lower head,
/// then earlier token) — the order of a stable descending sort of the flattened row.
fn adakv_batch_row(flat: &[f64], heads: usize, n_kept: usize, n_safe: usize) -> Vec<Vec<i64>> {
    let t = flat.len() / heads;
    let mut boosted = flat.to_vec();
    let mut order: Vec<usize> = Vec::with_capacity(flat.len());
    if n_safe > 0 {
        for h in 0..heads {
            let row = &flat[h * t..(h + 1) * t];
            order.clear();
            order.extend(0..t);
            if n_safe < t {
                order.select_nth_unstable_by(n_safe - 1, |a, c| {
                    row[*c]
                        .partial_cmp(&row[*a])
                        .unwrap_or(Ordering::Equal)
                        .then(a.cmp(c))
                });
            }
            for &i in &order[..n_safe.min(t)] {
                boosted[h * t + i] = f64::INFINITY;
            }
        }
    }
    let total = (heads * n_kept).min(flat.len());
    order.clear();
    order.extend(0..flat.len());
    if total < flat.len() {
        order.select_nth_unstable_by(total - 1, |a, c| {
            boosted[*c]
                .partial_cmp(&boosted[*a])
                .unwrap_or(Ordering::Equal)
                .then(a.cmp(c))
        });
    }
    order.truncate(total);
    order.sort_unstable();
    let mut per_head = vec![Vec::new(); heads];
    for &f in &order {
        per_head[f / t].push((f % t) as i64);
    }
    per_head
}

/// The libtorch formulation of [`adakv_rows`] (sorts over every head's tokens), kept to
/// check the kernel against.
pub fn adakv_rows_libtorch(scores: &Tensor, n_kept: usize, alpha: f64) -> Result<Vec<Tensor>> {
    let size = scores.size();
    let (batch, heads, t) = (size[0], size[1], size[2]);
    let scores = scores.f_to(Device::Cpu)?.f_to_kind(Kind::Double)?;
    let mut n_safe = (n_kept as f64 * alpha) as usize;
    if alpha > 0.0 {
        n_safe = n_safe.max(1);
    }
    let boosted = if n_safe > 0 {
        let safe = top_k_indices(&scores, n_safe)?;
        scores.f_scatter_value(2, &safe, f64::INFINITY)?
    } else {
        scores
    };
    let total = heads * n_kept as i64;
    let flat = boosted.f_reshape([batch, heads * t])?;
    let order = flat
        .f_argsort_stable(true, -1, true)?
        .f_narrow(-1, 0, total)?;
    let mut rows = Vec::with_capacity((batch * heads) as usize);
    for b in 0..batch {
        let chosen: Vec<i64> = Vec::<i64>::try_from(order.f_get(b)?)?;
        let mut per_head = vec![Vec::new(); heads as usize];
        for flat_idx in chosen {
            per_head[(flat_idx / t) as usize].push(flat_idx % t);
        }
        for mut idx in per_head {
            idx.sort_unstable();
            rows.push(Tensor::f_from_slice(&idx)?);
        }
    }
    Ok(rows)
}
