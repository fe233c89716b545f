//! A property test of the layer state: random sequences of appends (with left padding on
//! the prompt), prompt compressions, decoding-time compressions, crops, batch reorderings,
//! repeats and resets, on random shapes and budgets, driven through `LayerState` and through
//! a straightforward reference written here (lists of tokens per row); kept positions,
//! tokens seen and stored, and `nbytes` compared after every step.
//!
//! Keys hold small integers, so Knorm's ranking (smallest ‖k‖, ties to the earlier token)
//! is exact in the reference's integer squared norms.

use kvpress_rs::decoding::DecodingSchedule;
use kvpress_rs::layer::{DecodingState, LayerState};
use kvpress_rs::policies::Knorm;
use kvpress_rs::{Budget, KeptPositions, Press};
use proptest::prelude::*;
use std::sync::Arc;
use tch::Tensor;

#[derive(Clone, Debug)]
enum Op {
    /// q new tokens; on an empty layer (a prompt) row b starts with `pads[b]` pads.
    Append {
        q: usize,
        pads: Vec<usize>,
        seed: u64,
    },
    Crop(usize),
    Reorder(Vec<usize>),
    Repeat(i64),
    Reset,
}

#[derive(Clone, Debug)]
struct Setup {
    batch: usize,
    heads: usize,
    dim: usize,
    ratio: f64,
    /// (budget N, interval M) of decoding-time compression.
    decoding: Option<(usize, usize)>,
}

/// One stored token of the reference: its original position and its key's squared norm.
#[derive(Clone, Copy, Debug)]
struct Token {
    position: i64,
    norm2: i64,
}

/// The reference: per (batch row, head) the visible tokens in storage order; per batch row
/// the hidden slots in front; the capacities of the store's buffers.
#[derive(Clone, Debug, Default)]
struct Reference {
    rows: Vec<Vec<Vec<Token>>>,
    hidden: Vec<usize>,
    pads: Vec<usize>,
    seen: usize,
    /// Real tokens appended since the last eviction, per batch row (what a crop may remove).
    tail: Vec<usize>,
    capacity: usize,
    positions_capacity: Option<usize>,
}

fn reserve(len: usize) -> usize {
    (len / 8).clamp(16, 64)
}

impl Reference {
    fn width(&self) -> usize {
        self.rows
            .first()
            .and_then(|r| r.first())
            .map_or(0, |t| t.len())
            + self.hidden.first().copied().unwrap_or(0)
    }

    fn batch(&self) -> usize {
        self.rows.len()
    }

    fn nbytes(&self, heads: usize, dim: usize) -> usize {
        let rows = self.batch() * heads;
        rows * self.capacity * dim * 4 * 2 + rows * self.positions_capacity.unwrap_or(0) * 4
    }

    fn kept_positions(&self) -> Vec<Vec<Vec<i64>>> {
        self.rows
            .iter()
            .enumerate()
            .map(|(b, heads)| {
                heads
                    .iter()
                    .map(|row| {
                        std::iter::repeat_n(-1, self.hidden[b])
                            .chain(row.iter().map(|t| t.position))
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Keeps `n` of `tokens`: the `protect` last ones, then the smallest norms (ties to the
    /// earlier token), in storage order.
    fn keep(tokens: &[Token], n: usize, protect: usize) -> Vec<Token> {
        let cut = tokens.len().saturating_sub(protect);
        let mut order: Vec<usize> = (0..cut).collect();
        order.sort_by_key(|&i| (tokens[i].norm2, i));
        let mut chosen: Vec<usize> = order.into_iter().take(n - (tokens.len() - cut)).collect();
        chosen.extend(cut..tokens.len());
        chosen.sort_unstable();
        chosen.into_iter().map(|i| tokens[i]).collect()
    }

    /// Row b keeps `counts[b]` (None: all) of its visible tokens; rows are padded to the
    /// widest with hidden slots.
    fn evict(&mut self, counts: &[Option<usize>], protect: usize) {
        for (b, heads) in self.rows.iter_mut().enumerate() {
            if let Some(n) = counts[b] {
                for row in heads.iter_mut() {
                    *row = Self::keep(row, n, protect);
                }
            }
        }
        let width = self.rows.iter().map(|h| h[0].len()).max().unwrap_or(0);
        self.hidden = self.rows.iter().map(|h| width - h[0].len()).collect();
        self.capacity = width;
        self.positions_capacity = Some(width);
        self.tail = vec![0; self.batch()];
    }
}

fn keys_for(batch: usize, heads: usize, q: usize, dim: usize, seed: u64) -> (Tensor, Vec<i64>) {
    // small integers from a counter-based hash: exact squared norms
    let mut data = Vec::with_capacity(batch * heads * q * dim);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..batch * heads * q * dim {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.push(((x % 7) as i64 - 3) as f32);
    }
    let norms = data
        .chunks(dim)
        .map(|c| c.iter().map(|&v| (v * v) as i64).sum())
        .collect();
    let t = Tensor::from_slice(&data).reshape([batch as i64, heads as i64, q as i64, dim as i64]);
    (t, norms)
}

fn new_state(setup: &Setup) -> LayerState {
    let press = Arc::new(Press::new(
        Box::new(Knorm),
        Budget::ratio(setup.ratio).unwrap(),
    ));
    let decoding = setup.decoding.map(|(n, m)| {
        let schedule =
            DecodingSchedule::from_args(Some(n as i64), None, Some(m as i64), false).unwrap();
        DecodingState::new(schedule, &press, None)
    });
    LayerState::compressed(0, Some(press), None, decoding)
}

/// Runs `op` on both; returns a description of a mismatch, if any.
fn step(
    state: &mut LayerState,
    reference: &mut Reference,
    setup: &Setup,
    op: &Op,
) -> Result<(), String> {
    let (heads, dim) = (setup.heads, setup.dim);
    match op {
        Op::Append { q, pads, seed } => {
            let prompt = reference.seen == 0;
            let batch = if prompt {
                setup.batch
            } else {
                reference.batch()
            };
            let q = if prompt { (*q).max(4) } else { *q };
            let pads: Vec<usize> = (0..batch)
                .map(|b| {
                    if prompt {
                        pads[b % pads.len()].min(q - 4)
                    } else {
                        0
                    }
                })
                .collect();
            let (keys, norms) = keys_for(batch, heads, q, dim, *seed);
            if pads.iter().any(|&p| p > 0) {
                let visible: Vec<bool> = (0..batch)
                    .flat_map(|b| (0..q).map(move |i| (b, i)))
                    .map(|(b, i)| i >= pads[b])
                    .collect();
                let visible = Tensor::from_slice(&visible).reshape([batch as i64, q as i64]);
                state.begin_forward(Some(&visible));
            } else {
                state.begin_forward(None);
            }
            let _attended = state
                .append(&keys, &keys, false)
                .map_err(|e| format!("append: {e}"))?;
            state.finish_forward().map_err(|e| format!("finish: {e}"))?;
            // the reference
            if prompt {
                *reference = Reference {
                    rows: vec![vec![vec![]; heads]; batch],
                    hidden: pads.clone(),
                    pads: pads.clone(),
                    seen: 0,
                    tail: vec![0; batch],
                    capacity: 0,
                    positions_capacity: None,
                };
            }
            for b in 0..batch {
                for h in 0..heads {
                    for i in pads[b]..q {
                        reference.rows[b][h].push(Token {
                            position: (reference.seen + i) as i64,
                            norm2: norms[(b * heads + h) * q + i],
                        });
                    }
                }
                reference.tail[b] += q - pads[b];
            }
            let len = reference.width();
            if prompt {
                reference.capacity = q;
            } else {
                if len > reference.capacity {
                    reference.capacity = len + reserve(len);
                }
                if let Some(c) = reference.positions_capacity {
                    if len > c {
                        reference.positions_capacity = Some(len + reserve(len));
                    }
                }
            }
            reference.seen += q;
            if prompt && setup.ratio > 0.0 {
                let counts: Vec<Option<usize>> = (0..batch)
                    .map(|b| {
                        let t = q - pads[b];
                        Some((t as f64 * (1.0 - setup.ratio)) as usize)
                    })
                    .collect();
                if (0..batch).any(|b| counts[b] < Some(q - pads[b])) {
                    reference.evict(&counts, 0);
                }
            }
            if let Some((n, m)) = setup.decoding {
                let counts: Vec<Option<usize>> = (0..batch)
                    .map(|b| {
                        let stored = reference.rows[b][0].len();
                        let due = if q > 1 { stored > n } else { stored >= n + m };
                        (due && n < stored).then_some(n)
                    })
                    .collect();
                if counts.iter().any(Option::is_some) {
                    reference.evict(&counts, m);
                }
            }
        }
        Op::Crop(n) => {
            let n = (*n).min(reference.tail.iter().copied().min().unwrap_or(0));
            if n == 0 || reference.seen == 0 {
                return Ok(());
            }
            state.crop(n).map_err(|e| format!("crop {n}: {e}"))?;
            for heads in reference.rows.iter_mut() {
                for row in heads.iter_mut() {
                    row.truncate(row.len() - n);
                }
            }
            for t in reference.tail.iter_mut() {
                *t -= n;
            }
            reference.seen -= n;
            let len = reference.width();
            reference.capacity = len;
            reference.positions_capacity = reference.positions_capacity.map(|_| len);
        }
        Op::Reorder(_) | Op::Repeat(_) if reference.seen == 0 => {}
        Op::Reorder(raw) => {
            let order: Vec<usize> = raw.iter().map(|&i| i % reference.batch()).collect();
            let index = Tensor::from_slice(&order.iter().map(|&b| b as i64).collect::<Vec<_>>());
            state
                .index_batch(&index)
                .map_err(|e| format!("index_batch: {e}"))?;
            reorder(reference, &order);
        }
        Op::Repeat(r) => {
            state
                .repeat_interleave_batch(*r)
                .map_err(|e| format!("repeat: {e}"))?;
            let order: Vec<usize> = (0..reference.batch())
                .flat_map(|b| std::iter::repeat_n(b, *r as usize))
                .collect();
            reorder(reference, &order);
        }
        Op::Reset => {
            state.reset().map_err(|e| format!("reset: {e}"))?;
            *reference = Reference::default();
        }
    }
    compare(state, reference, heads, dim, op)
}

fn reorder(reference: &mut Reference, order: &[usize]) {
    reference.rows = order.iter().map(|&b| reference.rows[b].clone()).collect();
    reference.hidden = order.iter().map(|&b| reference.hidden[b]).collect();
    reference.pads = order.iter().map(|&b| reference.pads[b]).collect();
    reference.tail = order.iter().map(|&b| reference.tail[b]).collect();
    let len = reference.width();
    reference.capacity = len;
    reference.positions_capacity = reference.positions_capacity.map(|_| len);
}

fn compare(
    state: &LayerState,
    reference: &Reference,
    heads: usize,
    dim: usize,
    op: &Op,
) -> Result<(), String> {
    let ctx = || format!("after {op:?}");
    if state.seen() != reference.seen || state.stored() != reference.width() {
        return Err(format!(
            "{}: seen/stored {}/{} vs reference {}/{}",
            ctx(),
            state.seen(),
            state.stored(),
            reference.seen,
            reference.width()
        ));
    }
    if state.nbytes() != reference.nbytes(heads, dim) {
        return Err(format!(
            "{}: nbytes {} vs reference {} ({reference:?})",
            ctx(),
            state.nbytes(),
            reference.nbytes(heads, dim)
        ));
    }
    if reference.seen == 0 {
        return Ok(());
    }
    let got = match state.kept_positions().map_err(|e| e.to_string())? {
        KeptPositions::Uniform(t) => {
            let s = t.size();
            let flat = Vec::<i64>::try_from(t.flatten(0, -1)).map_err(|e| e.to_string())?;
            flat.chunks(s[2] as usize)
                .collect::<Vec<_>>()
                .chunks(s[1] as usize)
                .map(|h| h.iter().map(|r| r.to_vec()).collect())
                .collect::<Vec<Vec<Vec<i64>>>>()
        }
        KeptPositions::Ragged(_) => return Err(format!("{}: ragged rows", ctx())),
    };
    if got != reference.kept_positions() {
        return Err(format!(
            "{}: kept positions {got:?} vs reference {:?}",
            ctx(),
            reference.kept_positions()
        ));
    }
    Ok(())
}

fn setups() -> impl Strategy<Value = Setup> {
    (
        1usize..4,
        1usize..3,
        prop::sample::select(vec![4usize, 8]),
        prop::sample::select(vec![0.0, 0.25, 0.5, 0.75]),
        prop::option::of((4usize..12, 1usize..5)),
    )
        .prop_map(|(batch, heads, dim, ratio, decoding)| Setup {
            batch,
            heads,
            dim,
            ratio,
            decoding: decoding.map(|(n, m)| (n.max(m), m)),
        })
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (1usize..12, prop::collection::vec(0usize..6, 1..4), any::<u64>())
            .prop_map(|(q, pads, seed)| Op::Append { q, pads, seed }),
        4 => (any::<u64>()).prop_map(|seed| Op::Append { q: 1, pads: vec![0], seed }),
        1 => (1usize..4).prop_map(Op::Crop),
        1 => prop::collection::vec(0usize..4, 1..4).prop_map(Op::Reorder),
        1 => (1i64..3).prop_map(Op::Repeat),
        1 => Just(Op::Reset),
    ];
    prop::collection::vec(op, 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_layer_state_follows_the_reference(setup in setups(), ops in ops()) {
        let mut state = new_state(&setup);
        let mut reference = Reference::default();
        for op in &ops {
            if let Err(why) = step(&mut state, &mut reference, &setup, op) {
                prop_assert!(false, "{setup:?}: {why}");
            }
        }
    }
}

#[test]
fn the_reference_is_not_vacuous() {
    // a hand-made case the reference and the state must agree on, with an eviction
    let setup = Setup {
        batch: 2,
        heads: 1,
        dim: 4,
        ratio: 0.5,
        decoding: Some((6, 2)),
    };
    let mut state = new_state(&setup);
    let mut reference = Reference::default();
    let seq = [
        Op::Append {
            q: 10,
            pads: vec![0, 3],
            seed: 1,
        },
        Op::Append {
            q: 1,
            pads: vec![0],
            seed: 2,
        },
        Op::Append {
            q: 1,
            pads: vec![0],
            seed: 3,
        },
    ];
    for op in &seq {
        step(&mut state, &mut reference, &setup, op).unwrap();
    }
    // 10 and 7 real tokens keep 5 and 3; the short row pads with 2 of its 3 pads
    assert_eq!(reference.hidden, vec![0, 2]);
    assert!(state.kept_positions().is_ok());
}
