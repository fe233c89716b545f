//! [`AngleTable`]: cos/sin of p·θ_f for any position p, cheap enough to re-apply RoPE to
//! every cached key at every decode step (quantized pre-RoPE keys).
//!
//! A full table over positions would cost rotary_dim·4 bytes per position and layer — as
//! much as the quantized keys it serves. Instead p = a·F + b (F = [`FINE`]) and
//! R(p) = R(a·F)·R(b): a coarse table over a (one entry per F positions, grown as positions
//! arrive) and a fine table over b < F. Both are computed from f64 angles reduced modulo
//! 2π and stored in f32; one product of two rotations costs 4 multiplies per channel pair,
//! its error is about 2·2⁻²⁴ — far below bf16's — at any position.

use super::angles::{reduced_angle, sin_cos_reduced};
use super::{Layout, Rope};
use crate::error::{KvError, Result};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// One table serving the quantized stores of every layer of a cache (they share a RoPE).
pub type SharedAngleTable = Arc<RwLock<AngleTable>>;

/// A new table of `rope`, ready to be shared.
pub fn shared(rope: &Rope) -> Result<SharedAngleTable> {
    Ok(Arc::new(RwLock::new(AngleTable::new(rope)?)))
}

/// The shared table read-locked. A poisoned lock still holds a consistent table: `cover`
/// only appends whole entries.
pub fn read(table: &SharedAngleTable) -> RwLockReadGuard<'_, AngleTable> {
    table.read().unwrap_or_else(PoisonError::into_inner)
}

/// The shared table write-locked (see [`read`]).
pub fn write(table: &SharedAngleTable) -> RwLockWriteGuard<'_, AngleTable> {
    table.write().unwrap_or_else(PoisonError::into_inner)
}

/// Positions per coarse entry.
pub const FINE: usize = 64;

/// cos/sin tables of one RoPE. See the module documentation.
#[derive(Clone, Debug)]
pub struct AngleTable {
    inv_freq: Vec<f64>,
    layout: Layout,
    rotary_dim: usize,
    /// The attention scaling, folded into the coarse table.
    scale: f64,
    /// (cos, sin) of b·θ_f, [f][b] for b < FINE: a run of positions reads it contiguously.
    fine: Vec<(f32, f32)>,
    /// (cos, sin) of a·FINE·θ_f, times `scale`, [a][f] for a < coarse.len() / n_freq.
    coarse: Vec<(f32, f32)>,
}

impl AngleTable {
    /// The table of `rope` with its configured frequencies. Rope types whose frequencies
    /// depend on the sequence length (`dynamic`, `longrope`) are refused: a key quantized
    /// without RoPE could not be rotated back the same way at every length.
    pub fn new(rope: &Rope) -> Result<Self> {
        if rope.scaling().depends_on_seq_len() {
            return Err(KvError::Unsupported(format!(
                "pre_rope_keys=True with rope_type {:?}: its frequencies change with the \
                 sequence length, so keys stored before RoPE could not be rotated back \
                 consistently; use pre_rope_keys=False",
                rope.rope_type()
            )));
        }
        let inv_freq = rope.inv_freq(None);
        let scale = rope.attention_scaling();
        let mut fine = Vec::with_capacity(FINE * inv_freq.len());
        for &theta in &inv_freq {
            for b in 0..FINE {
                let (s, c) = sin_cos_reduced(reduced_angle(b as i64, theta));
                fine.push((c as f32, s as f32));
            }
        }
        Ok(AngleTable {
            inv_freq,
            layout: rope.layout(),
            rotary_dim: rope.rotary_dim(),
            scale,
            fine,
            coarse: Vec::new(),
        })
    }

    fn n_freq(&self) -> usize {
        self.inv_freq.len()
    }

    /// Positions covered without growing: [0, covered).
    pub fn covered(&self) -> usize {
        self.coarse.len() / self.n_freq() * FINE
    }

    /// Makes the table cover positions [0, end).
    pub fn cover(&mut self, end: usize) {
        let n = self.n_freq();
        let want = end.div_ceil(FINE);
        for a in self.coarse.len() / n..want {
            for &theta in &self.inv_freq {
                let (s, c) = sin_cos_reduced(reduced_angle((a * FINE) as i64, theta));
                self.coarse
                    .push(((c * self.scale) as f32, (s * self.scale) as f32));
            }
        }
    }

    /// Bytes held by the tables.
    pub fn nbytes(&self) -> usize {
        (self.fine.len() + self.coarse.len()) * std::mem::size_of::<(f32, f32)>()
    }

    pub fn attention_scaling(&self) -> f64 {
        self.scale
    }

    /// The first `len` tokens of the two channel rows frequency `f` rotates together.
    #[inline(always)]
    fn pair_rows<'a>(
        &self,
        kt: &'a mut [f32],
        stride: usize,
        f: usize,
        len: usize,
    ) -> (&'a mut [f32], &'a mut [f32]) {
        let (c1, c2) = match self.layout {
            Layout::RotateHalf => (f, f + self.rotary_dim / 2),
            Layout::Interleaved => (2 * f, 2 * f + 1),
        };
        let (lo, hi) = kt.split_at_mut(c2 * stride);
        (&mut lo[c1 * stride..c1 * stride + len], &mut hi[..len])
    }

    /// Applies s·R(p) in place to `len` keys stored transposed — channel c of token k at
    /// `kt[c * stride + k]` — at `positions[k]` (each < [`covered`](Self::covered)).
    #[inline(always)]
    pub fn apply_transposed(&self, kt: &mut [f32], stride: usize, positions: &[i32], len: usize) {
        let n = self.n_freq();
        for f in 0..n {
            let (x1s, x2s) = self.pair_rows(kt, stride, f, len);
            for k in 0..len {
                let p = positions[k] as usize;
                let (ca, sa) = self.coarse[(p / FINE) * n + f];
                let (cb, sb) = self.fine[f * FINE + p % FINE];
                let (c, s) = (ca * cb - sa * sb, sa * cb + ca * sb);
                let (x1, x2) = (x1s[k], x2s[k]);
                x1s[k] = x1 * c - x2 * s;
                x2s[k] = x2 * c + x1 * s;
            }
        }
        // Channels beyond rotary_dim pass through unscaled, as in `Rope::apply`.
    }

    /// [`apply_transposed`](Self::apply_transposed) at positions `start, start + 1, …`:
    /// per FINE tokens one base rotation s·R(b) from the tables, then R(b + k) = R(b)·R(k)
    /// with R(k) read contiguously from the fine table — no per-token lookups, a loop the
    /// compiler vectorizes.
    #[inline(always)]
    pub fn apply_run_transposed(&self, kt: &mut [f32], stride: usize, start: usize, len: usize) {
        let n = self.n_freq();
        for f in 0..n {
            let (x1s, x2s) = self.pair_rows(kt, stride, f, len);
            let fine = &self.fine[f * FINE..(f + 1) * FINE];
            for (j, (x1c, x2c)) in x1s.chunks_mut(FINE).zip(x2s.chunks_mut(FINE)).enumerate() {
                let b = start + j * FINE;
                let (ca, sa) = self.coarse[(b / FINE) * n + f];
                let (cf, sf) = fine[b % FINE];
                let (c0, s0) = (ca * cf - sa * sf, sa * cf + ca * sf);
                for ((x1, x2), &(ck, sk)) in x1c.iter_mut().zip(x2c.iter_mut()).zip(fine) {
                    let (c, s) = (c0 * ck - s0 * sk, s0 * ck + c0 * sk);
                    let (u, v) = (*x1, *x2);
                    *x1 = u * c - v * s;
                    *x2 = v * c + u * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope::RopeSpec;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn transposed_rotation_equals_apply() {
        for layout in [Layout::RotateHalf, Layout::Interleaved] {
            let mut spec = RopeSpec::new(16, 10_000.0);
            spec.layout = layout;
            spec.rotary_dim = Some(12);
            spec.rope_type = "yarn".into();
            spec.params.factor = Some(4.0);
            spec.params.original_max_position_embeddings = Some(64);
            let rope = Rope::new(spec).unwrap();
            let mut table = AngleTable::new(&rope).unwrap();
            let positions: Vec<i32> = vec![0, 1, 63, 64, 65, 1000, 123_457, 7];
            table.cover(123_458);
            let x = Tensor::randn([1, 1, 8, 16], (Kind::Float, Device::Cpu));
            let pos = Tensor::from_slice(&positions).to_kind(Kind::Int64);
            let expected = rope.apply(&x, &pos, None).unwrap();
            // transposed: (16 channels, 8 tokens)
            let xt = x.view([8, 16]).transpose(0, 1).contiguous();
            let mut kt: Vec<f32> = Vec::<f32>::try_from(xt.flatten(0, -1)).unwrap();
            table.apply_transposed(&mut kt, 8, &positions, 8);
            let got = Tensor::from_slice(&kt).view([16, 8]).transpose(0, 1);
            let err = (got - expected.view([8, 16])).abs().max().double_value(&[]);
            assert!(err < 2e-6, "{layout:?}: {err}");
        }
    }

    #[test]
    fn a_run_of_positions_rotates_like_the_same_positions_given_one_by_one() {
        for layout in [Layout::RotateHalf, Layout::Interleaved] {
            let mut spec = RopeSpec::new(16, 10_000.0);
            spec.layout = layout;
            spec.rope_type = "yarn".into(); // attention scaling != 1
            spec.params.factor = Some(4.0);
            spec.params.original_max_position_embeddings = Some(64);
            let rope = Rope::new(spec).unwrap();
            let mut table = AngleTable::new(&rope).unwrap();
            table.cover(100_000);
            // 150 tokens from an unaligned start: three chunks, crossing coarse entries;
            // a stride above the length leaves the last columns alone
            let (start, len, stride) = (70_001usize, 150usize, 160usize);
            let x: Vec<f32> = (0..16 * stride)
                .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
                .collect();
            let positions: Vec<i32> = (0..len).map(|k| (start + k) as i32).collect();
            let (mut run, mut given) = (x.clone(), x.clone());
            table.apply_run_transposed(&mut run, stride, start, len);
            table.apply_transposed(&mut given, stride, &positions, len);
            for (i, (a, b)) in run.iter().zip(&given).enumerate() {
                assert!((a - b).abs() < 4e-6, "{layout:?} element {i}: {a} vs {b}");
            }
            for c in 0..16 {
                assert_eq!(
                    run[c * stride + len..(c + 1) * stride],
                    x[c * stride + len..(c + 1) * stride]
                );
            }
        }
    }
}
