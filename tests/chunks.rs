//! Chunk reuse: placement of encoded chunks at their offsets (keys equal keys rotated
//! directly at the target positions), kept positions and tokens seen of the assembled
//! store, the choice of tokens to recompute against plain sorting, and errors.

mod common;

use common::*;
use kvpress_rs::chunks::recompute::select_deviating;
use kvpress_rs::chunks::{assemble, ChunkLayer};
use kvpress_rs::rope::{Rope, RopeSpec, ScalingParams};
use kvpress_rs::{KeptPositions, KvError, LayerStore};
use tch::{Kind, Tensor};

fn pre_keys(tokens: i64, seed: u64) -> Tensor {
    randn(&[1, 2, tokens, 8], seed, Kind::Float)
}

fn arange(start: i64, end: i64) -> Tensor {
    Tensor::arange_start(start, end, (Kind::Int64, CPU))
}

fn rope() -> Rope {
    Rope::new(RopeSpec::new(8, 10_000.0)).unwrap()
}

#[track_caller]
fn assert_close(got: &Tensor, want: &Tensor, tol: f64) {
    let (g, w) = (values_f64(got), values_f64(want));
    assert_eq!(dims(got), dims(want));
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= tol, "max difference {worst:e} > {tol:e}");
}

#[test]
fn chunks_land_at_their_offsets() {
    let rope = rope();
    let sizes = [5i64, 3, 7];
    let pre: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pre_keys(n, i as u64))
        .collect();
    let parts: Vec<ChunkLayer> = pre
        .iter()
        .zip(sizes)
        .map(|(p, n)| ChunkLayer {
            keys: rope.apply(p, &arange(0, n), None).unwrap(),
            values: p.shallow_clone() * 2.0,
            positions: None,
            tokens: n as usize,
        })
        .collect();
    let store = assemble(&rope, &parts).unwrap();
    assert_eq!(
        (store.seen(), store.len(), store.has_evicted()),
        (15, 15, false)
    );
    let keys = store.keys_view().unwrap();
    let mut offset = 0;
    for (p, n) in pre.iter().zip(sizes) {
        let direct = rope.apply(p, &arange(offset, offset + n), None).unwrap();
        assert_close(&keys.narrow(2, offset, n), &direct, 1e-6);
        assert_close(
            &store.values_view().unwrap().narrow(2, offset, n),
            &(p * 2.0),
            0.0,
        );
        offset += n;
    }
    // nothing evicted: no positions are held, only keys and values
    assert_eq!(store.nbytes(), 2 * 15 * 2 * 8 * 4);
}

#[test]
fn compressed_chunks_keep_their_positions_offset() {
    let rope = rope();
    let pre = pre_keys(6, 3);
    let full = rope.apply(&pre, &arange(0, 6), None).unwrap();
    // head 0 keeps tokens {1, 4}, head 1 keeps {0, 5}
    let kept = tensor_i64(&[1, 4, 0, 5], &[1, 2, 2]);
    let keys = full.gather(2, &kept.unsqueeze(-1).expand([1, 2, 2, 8], false), false);
    let parts = [
        ChunkLayer {
            keys: full.shallow_clone(),
            values: full.shallow_clone(),
            positions: None,
            tokens: 6,
        },
        ChunkLayer {
            keys: keys.shallow_clone(),
            values: keys.shallow_clone(),
            positions: Some(kept.shallow_clone()),
            tokens: 6,
        },
    ];
    let store = assemble(&rope, &parts).unwrap();
    assert_eq!((store.seen(), store.len()), (12, 8));
    let KeptPositions::Uniform(positions) = store.kept_positions().unwrap() else {
        panic!("uniform rows expected")
    };
    assert_eq!(
        values_i64(&positions),
        vec![0, 1, 2, 3, 4, 5, 7, 10, 0, 1, 2, 3, 4, 5, 6, 11]
    );
    // the kept keys are the keys rotated directly at their global positions
    let global = kept.shallow_clone() + 6;
    let direct = rope
        .apply(
            &pre.gather(2, &kept.unsqueeze(-1).expand([1, 2, 2, 8], false), false),
            &global,
            None,
        )
        .unwrap();
    assert_close(&store.keys_view().unwrap().narrow(2, 6, 2), &direct, 1e-6);
    // decoding continues at the total count
    let mut store = store;
    let one = Tensor::zeros([1, 2, 1, 8], (Kind::Float, CPU));
    let _ = store.append(&one, &one).unwrap();
    let KeptPositions::Uniform(positions) = store.kept_positions().unwrap() else {
        panic!()
    };
    assert_eq!(values_i64(&positions.narrow(2, 8, 1)), vec![12, 12]);
}

#[test]
fn select_deviating_matches_plain_sorting() {
    let reused = randn(&[2, 3, 40, 4], 7, Kind::Float);
    let fresh = &reused + randn(&[2, 3, 40, 4], 8, Kind::Float);
    let mut mask = vec![true; 40];
    mask[..10].iter_mut().for_each(|m| *m = false);
    let candidates = Tensor::from_slice(&mask);
    let chosen = select_deviating(&reused, &fresh, &candidates, 6).unwrap();
    // reference: per-token squared deviation summed in f64, sorted by hand
    let (r, f) = (values_f64(&reused), values_f64(&fresh));
    let mut dev = vec![0.0; 40];
    for (i, (a, b)) in r.iter().zip(&f).enumerate() {
        dev[(i / 4) % 40] += (b - a) * (b - a);
    }
    let mut order: Vec<usize> = (10..40).collect();
    order.sort_by(|&a, &b| dev[b].total_cmp(&dev[a]).then(a.cmp(&b)));
    let mut want: Vec<i64> = order[..6].iter().map(|&i| i as i64).collect();
    want.sort();
    assert_eq!(values_i64(&chosen), want);
    assert!(matches!(
        select_deviating(&reused, &fresh, &candidates, 31),
        Err(KvError::InvalidArgument { .. })
    ));
}

#[test]
fn overwrite_replaces_only_the_given_tokens() {
    let keys = pre_keys(5, 1);
    let mut store = LayerStore::from_tokens(keys.copy(), keys.copy(), None, 5).unwrap();
    let view_before = store.keys_view().unwrap();
    let new = Tensor::ones([1, 2, 2, 8], (Kind::Float, CPU));
    store
        .overwrite_tokens(&tensor_i64(&[1, 3], &[2]), &new, &new)
        .unwrap();
    let after = store.keys_view().unwrap();
    for t in 0..5 {
        let want = if t == 1 || t == 3 {
            new.narrow(2, 0, 1)
        } else {
            keys.narrow(2, t, 1)
        };
        assert_close(&after.narrow(2, t, 1), &want, 0.0);
    }
    // views handed out earlier still show the old tokens
    assert_close(&view_before, &keys, 0.0);
    assert!(store
        .overwrite_tokens(
            &tensor_i64(&[5], &[1]),
            &new.narrow(2, 0, 1),
            &new.narrow(2, 0, 1)
        )
        .is_err());
}

#[test]
fn mismatched_chunks_and_bad_positions_are_refused() {
    let rope = rope();
    let k = pre_keys(4, 0);
    let part = |keys: &Tensor, positions: Option<Tensor>, tokens| ChunkLayer {
        keys: keys.shallow_clone(),
        values: keys.shallow_clone(),
        positions,
        tokens,
    };
    let other_heads = Tensor::zeros([1, 3, 4, 8], (Kind::Float, CPU));
    assert!(matches!(
        assemble(&rope, &[part(&k, None, 4), part(&other_heads, None, 4)]),
        Err(KvError::Shape { .. })
    ));
    let half = k.to_kind(Kind::Half);
    assert!(matches!(
        assemble(&rope, &[part(&k, None, 4), part(&half, None, 4)]),
        Err(KvError::Dtype { .. })
    ));
    assert!(matches!(
        assemble(&rope, &[part(&k, None, 3)]),
        Err(KvError::InvalidArgument { .. })
    ));
    let two = k.narrow(2, 0, 2);
    let outside = tensor_i64(&[0, 4, 0, 1], &[1, 2, 2]);
    assert!(matches!(
        assemble(&rope, &[part(&two, Some(outside), 4)]),
        Err(KvError::InvalidArgument { .. })
    ));
    let descending = tensor_i64(&[2, 1, 0, 1], &[1, 2, 2]);
    assert!(matches!(
        assemble(&rope, &[part(&two, Some(descending), 4)]),
        Err(KvError::InvalidArgument { .. })
    ));
    assert!(matches!(assemble(&rope, &[]), Err(KvError::Empty { .. })));
    // dynamic NTK frequencies change beyond max_position_embeddings: refused there
    let dynamic = Rope::new(RopeSpec {
        rope_type: "dynamic".into(),
        params: ScalingParams {
            factor: Some(2.0),
            max_position_embeddings: Some(6),
            ..Default::default()
        },
        ..RopeSpec::new(8, 10_000.0)
    })
    .unwrap();
    assert!(assemble(&dynamic, &[part(&k, None, 4)]).is_ok());
    assert!(matches!(
        assemble(&dynamic, &[part(&k, None, 4), part(&k, None, 4)]),
        Err(KvError::InvalidArgument { .. })
    ));
}

// -- quantized chunks: store parts and assembly (`kvpress_rs::quant::parts`) -----------------

mod quantized {
    use super::*;
    use kvpress_rs::quant::parts::{assemble as assemble_parts, export, NamedParts};
    use kvpress_rs::quant::store::StoreShape;
    use kvpress_rs::quant::{QuantConfig, QuantizedStore};
    use std::collections::HashMap;

    fn config() -> QuantConfig {
        QuantConfig {
            pre_rope_keys: true,
            ..QuantConfig::new(4, 32, 0).unwrap()
        }
    }

    fn rope64() -> Rope {
        Rope::new(RopeSpec::new(64, 10_000.0)).unwrap()
    }

    fn chunk(tokens: i64, seed: u64) -> HashMap<String, Tensor> {
        let mut store = QuantizedStore::with_rope(config(), Some(&rope64())).unwrap();
        let k = randn(&[1, 2, tokens, 64], seed, Kind::Float);
        store.append(&k, &k.f_mul_scalar(2.0).unwrap()).unwrap();
        export(&store).unwrap().into_iter().collect()
    }

    fn shape() -> StoreShape {
        StoreShape {
            batch: 1,
            heads: 2,
            key_dim: 64,
            value_dim: 64,
            kind: Kind::Float,
            device: CPU,
        }
    }

    #[test]
    fn blocks_move_by_positions_and_codes_are_reused() {
        let (a, b) = (chunk(40, 1), chunk(70, 2));
        let parts = [
            NamedParts {
                tensors: a
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect(),
                tokens: 40,
            },
            NamedParts {
                tensors: b
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone()))
                    .collect(),
                tokens: 70,
            },
        ];
        let store = assemble_parts(config(), &rope64(), shape(), &parts).unwrap();
        // 8 + 6 full-precision tokens in front, blocks of 32 and 64 tokens, nothing in the window
        assert_eq!(
            (
                store.seen(),
                store.sink_len(),
                store.quantized_len(),
                store.residual_len()
            ),
            (110, 14, 96, 0)
        );
        let out: HashMap<String, Tensor> = export(&store).unwrap().into_iter().collect();
        for name in ["k.codes", "k.params", "v.codes", "v.params"] {
            assert!(out[&format!("block.0.{name}")].equal(&a[&format!("block.0.{name}")]));
            assert!(out[&format!("block.1.{name}")].equal(&b[&format!("block.0.{name}")]));
        }
        assert!(out["block.1.pos"].equal(&b["block.0.pos"].f_add_scalar(40).unwrap()));
        // the second chunk's remainder: shifted by 40 with one rotation
        let front = &out["front.k"];
        let shifted = rope64()
            .shift(&b["residual.k"], &Tensor::from(40i64), None)
            .unwrap();
        assert_close(&front.narrow(2, 8, 6), &shifted, 1e-6);
    }

    #[test]
    fn inconsistent_parts_are_errors_naming_the_part() {
        let mut a = chunk(40, 1);
        let params = a["block.0.v.params"].to_kind(Kind::Float);
        a.insert("block.0.v.params".into(), params);
        let parts = [NamedParts {
            tensors: a,
            tokens: 40,
        }];
        let err = assemble_parts(config(), &rope64(), shape(), &parts).unwrap_err();
        assert!(
            matches!(err, KvError::Dtype { ref argument, .. } if argument.contains("block.0.v.params")),
            "{err}"
        );
        let no_pre_rope = QuantConfig::new(4, 32, 0).unwrap();
        let parts = [NamedParts {
            tensors: chunk(40, 1),
            tokens: 40,
        }];
        assert!(matches!(
            assemble_parts(no_pre_rope, &rope64(), shape(), &parts),
            Err(KvError::InvalidArgument { .. })
        ));
    }
}
