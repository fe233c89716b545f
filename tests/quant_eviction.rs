//! Evicting tokens from a quantized store (decoding-time compression of a quantized cache):
//! kept tokens keep their exact bytes (token groups) or integer codes (channel groups) and
//! float16 scales/zeros, `nbytes` falls to the exact size of the kept tokens, attention
//! over the store equals a reference softmax over the dequantized kept tokens, and the
//! press protects the full-precision residual window.

mod common;

use common::*;
use kvpress_rs::policies::Knorm;
use kvpress_rs::press::{Decoding, Plan};
use kvpress_rs::quant::{QuantConfig, QuantizedStore};
use kvpress_rs::{Budget, Press};
use tch::{Kind, Tensor};

const B: i64 = 1;
const H: i64 = 2;
const D: i64 = 64;

fn store(config: QuantConfig, tokens: i64) -> QuantizedStore {
    let mut s = QuantizedStore::new(config).unwrap();
    let k = randn(&[B, H, tokens, D], 11, Kind::Float);
    let v = randn(&[B, H, tokens, D], 12, Kind::Float);
    s.append(&k, &v).unwrap();
    s
}

/// Per row: the quantized tokens `picks[row]` (ascending), then the whole residual window.
fn kept(s: &QuantizedStore, picks: &[Vec<i64>]) -> Tensor {
    let (stored, r) = (s.seen() as i64, s.residual_len() as i64);
    let rows: Vec<i64> = picks
        .iter()
        .flat_map(|p| p.iter().copied().chain(stored - r..stored))
        .collect();
    let n = rows.len() as i64 / (B * H);
    tensor_i64(&rows, &[B, H, n])
}

fn gather_tokens(x: &Tensor, idx: &Tensor) -> Tensor {
    let s = x.size();
    let mut index = idx.shallow_clone();
    for _ in 3..s.len() {
        index = index.unsqueeze(-1);
    }
    let mut shape = idx.size();
    shape.extend_from_slice(&s[3..]);
    x.gather(2, &index.expand(shape.as_slice(), false), false)
}

#[test]
fn kept_tokens_keep_their_bytes_codes_and_scales() {
    // KIVI: keys per channel over 32-token tiles, values per token; 160 quantized tokens.
    let mut s = store(QuantConfig::new(4, 32, 32).unwrap(), 180);
    assert_eq!((s.quantized_len(), s.residual_len()), (160, 20));
    // value bytes of every token, straight from the block (per-token groups: whole groups)
    let block_values = s.blocks()[0].values.codes().view([B, H, 160, D * 4 / 8]);
    let before = s.element_codes().unwrap();
    // rows evict different tokens: row 0 keeps tiles 0 and 3 partly, row 1 tile 2 partly
    let picks = vec![vec![0, 5, 31, 100, 101], vec![64, 65, 66, 70, 90]];
    let k = kept(&s, &picks);
    s.retain(&k).unwrap();
    assert_eq!((s.seen(), s.evicted(), s.blocks().len()), (25, 155, 0));
    let ragged = s.ragged().unwrap();
    assert_eq!(ragged.len, 5);
    assert_eq!(ragged.counts, vec![3, 2, 5]); // row 0: tiles 0 and 3; row 1: tile 2
    assert_eq!(ragged.tile_rows, vec![0, 2, 3]);
    let q = tensor_i64(&picks.concat(), &[B, H, 5]);
    // values: the kept tokens' packed bytes, unchanged
    assert!(gather_tokens(&block_values, &q).equal(&ragged.values.codes));
    // keys: the same integer codes, and every element's float16 scale/zero, bit for bit
    let after = s.element_codes().unwrap();
    for ((c0, p0, _), (c1, p1, _)) in before.iter().zip(&after) {
        assert!(gather_tokens(c0, &q).equal(c1));
        assert!(gather_tokens(p0, &q)
            .view_dtype(Kind::Int16)
            .equal(&p1.view_dtype(Kind::Int16)));
    }
    // a tile keeps its per-channel scales/zeros once per row, not per token
    assert_eq!(ragged.keys.params.size(), vec![3, D, 2]);
}

#[test]
fn nbytes_is_the_exact_size_of_the_kept_tokens() {
    let mut s = store(QuantConfig::new(4, 32, 32).unwrap(), 180);
    let full = s.nbytes();
    let picks = vec![vec![0, 5, 31, 100, 101], vec![64, 65, 66, 70, 90]];
    s.retain(&kept(&s, &picks)).unwrap();
    let residual = (B * H * (180 % 32) * 2 * D * 4) as usize; // the tokens it holds, f32 keys + values
    let codes = (B * H * 5 * 2 * D / 2) as usize; // 4-bit keys and values
    let key_params = 3 * D as usize * 4; // 3 tiles x 64 channels x (f16 scale, f16 zero)
    let value_params = (B * H * 5 * (D / 32) * 4) as usize; // per token, 2 groups
    let counts = 3;
    assert_eq!(
        s.nbytes(),
        residual + codes + key_params + value_params + counts
    );
    assert!(s.nbytes() < full);
}

#[test]
fn attention_after_eviction_matches_a_reference_over_the_kept_tokens() {
    let mut s = store(QuantConfig::new(3, 32, 64).unwrap(), 200);
    let (keys, values) = s.dequantize().unwrap();
    let picks = vec![
        (0..136).step_by(3).collect::<Vec<_>>(),
        (40..136).step_by(2).take(46).collect::<Vec<_>>(),
    ];
    let k = kept(&s, &picks);
    s.retain(&k).unwrap();
    let (kk, vv) = (gather_tokens(&keys, &k), gather_tokens(&values, &k));
    let query = randn(&[B, 2 * H, 1, D], 3, Kind::Float);
    let out = s.attend(&query, None, 0.125).unwrap();
    let kr = kk.repeat_interleave_self_int(2, 1, None);
    let vr = vv.repeat_interleave_self_int(2, 1, None);
    let reference = (query.matmul(&kr.transpose(-1, -2)) * 0.125)
        .softmax(-1, Kind::Float)
        .matmul(&vr)
        .transpose(1, 2);
    let diff = f64::try_from((out - reference).abs().max()).unwrap();
    assert!(diff < 1e-5, "max difference {diff}");
}

#[test]
fn a_press_evicts_quantized_tokens_but_never_the_residual_window() {
    let mut s = store(QuantConfig::new(4, 32, 64).unwrap(), 200);
    assert_eq!(s.residual_len(), 8);
    let press = Press::new(Box::new(Knorm), Budget::ratio(0.0).unwrap());
    // protect_last 4 < residual 8: the whole residual window is protected anyway
    let step = |n_kept| {
        Plan::decoding(
            0,
            Decoding {
                n_kept,
                next_position: 200,
                protect_first: 0,
                protect_last: 4,
            },
        )
    };
    assert!(press.compress(&mut s, step(50)).unwrap().evicted);
    assert_eq!((s.seen(), s.residual_len(), s.evicted()), (50, 8, 150));
    // fewer tokens than the protected residual window: an error naming decoding_budget
    let e = press.compress(&mut s, step(6)).unwrap_err();
    assert!(e.to_string().contains("decoding_budget"), "{e}");
}

#[test]
fn retain_refuses_to_drop_full_precision_tokens() {
    let mut s = store(QuantConfig::new(4, 32, 32).unwrap(), 180);
    let bad = tensor_i64(&[0, 1, 2, 3, 0, 1, 2, 3], &[B, H, 4]);
    let e = s.retain(&bad).unwrap_err();
    assert_eq!(variant(&e), "InvalidArgument");
    assert!(e.to_string().contains("kept"));
    assert_eq!(s.seen(), 180);
}
