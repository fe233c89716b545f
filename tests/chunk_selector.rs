//! ChunkKV's chunk-wise selection and its entropy-gated variant: exact kept indices on
//! crafted scores, agreement with kvpress's definitions written here in torch (whole chunks
//! ranked by the mean over the chunk of the scores summed over heads, wherever that keeps
//! exactly the budget; the entropy gate's greedy pass), protected tokens kept, and the
//! selector inside a press on a store.

use kvpress_rs::policies::{ParamValue, Params};
use kvpress_rs::press::{
    chunk_selection, entropy_chunk_selection, Chunks, EntropyChunks, Plan, Selector,
};
use kvpress_rs::registry::{build_press, PressSpec};
use kvpress_rs::LayerStore;
use tch::{Device, Kind, Tensor};

fn indices(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.contiguous().view(-1)).unwrap()
}

#[test]
fn whole_chunks_in_rank_order_then_the_best_tokens_of_the_next() {
    // chunks of 3: [0..3) mean 1, [3..6) mean 4, [6..9) mean 2, [9..10) mean 9 (short last)
    let s = [1.0, 1.0, 1.0, 4.0, 4.0, 4.0, 0.0, 5.0, 1.0, 9.0];
    assert_eq!(chunk_selection(&s, 4, 3), vec![3, 4, 5, 9]);
    // 5 tokens: chunks 9, [3..6), then the best token of [6..9): 7
    assert_eq!(chunk_selection(&s, 5, 3), vec![3, 4, 5, 7, 9]);
    assert_eq!(chunk_selection(&s, 10, 3), (0..10).collect::<Vec<i64>>());
    // equal chunk means: the earlier chunk
    assert_eq!(chunk_selection(&[2.0, 2.0, 2.0, 2.0], 2, 2), vec![0, 1]);
    // a chunk longer than the sequence is one chunk: the best tokens
    assert_eq!(chunk_selection(&[0.0, 3.0, 1.0], 2, 20), vec![1, 2]);
}

#[test]
fn heads_are_summed_and_share_their_chunks() {
    // head 0 prefers chunk 0 a little, head 1 prefers chunk 1 a lot: the sum picks chunk 1
    let scores = Tensor::from_slice(&[2.0f32, 2.0, 1.0, 1.0, 0.0, 0.0, 9.0, 9.0]).view([1, 2, 4]);
    let kept = Chunks { chunk_length: 2 }.select(&scores, 2).unwrap();
    assert_eq!(kept.size(), vec![1, 2, 2]);
    assert_eq!(indices(&kept), vec![2, 3, 2, 3]);
}

/// kvpress's ChunkKV, written from its definition: per batch row, chunk scores = mean over
/// the chunk of the scores summed over heads; the top `n_chunks_kept` chunks, whole.
fn reference(scores: &Tensor, chunk: i64, n_chunks_kept: i64) -> Vec<Vec<i64>> {
    let (b, t) = (scores.size()[0], scores.size()[2]);
    let per_chunk = scores
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
        .view([b, t / chunk, chunk])
        .mean_dim([2i64].as_slice(), false, Kind::Double);
    let (_, top) = per_chunk.topk(n_chunks_kept, -1, true, true);
    (0..b)
        .map(|row| {
            let mut kept: Vec<i64> = indices(&top.get(row))
                .into_iter()
                .flat_map(|c| c * chunk..(c + 1) * chunk)
                .collect();
            kept.sort();
            kept
        })
        .collect()
}

#[test]
fn equals_kvpress_definition_when_the_budget_is_whole_chunks() {
    tch::manual_seed(7);
    for (batch, heads, chunk, n_chunks, kept_chunks) in [
        (1, 3, 20, 60, 30),
        (2, 2, 4, 25, 6),
        (3, 5, 7, 9, 1),
        (1, 1, 1, 50, 17),
    ] {
        let t = chunk * n_chunks;
        let scores = Tensor::randn([batch, heads, t], (Kind::Float, Device::Cpu));
        let ours = Chunks {
            chunk_length: chunk as usize,
        }
        .select(&scores, (kept_chunks * chunk) as usize)
        .unwrap();
        let expected = reference(&scores, chunk, kept_chunks);
        for (b, exp) in expected.iter().enumerate() {
            for h in 0..heads {
                assert_eq!(
                    &indices(&ours.get(b as i64).get(h)),
                    exp,
                    "batch {b} head {h}"
                );
            }
        }
    }
}

#[test]
fn bad_inputs_are_refused_with_the_argument_named() {
    let sel = Chunks { chunk_length: 4 };
    let s = Tensor::zeros([1, 2, 8], (Kind::Float, Device::Cpu));
    assert!(sel.select(&s, 9).unwrap_err().to_string().contains("k"));
    assert!(sel.select(&s, 0).is_err());
    assert!(sel
        .select(&s.view([2, 8]), 2)
        .unwrap_err()
        .to_string()
        .contains("scores"));
    let nan = Tensor::from_slice(&[1.0f32, f32::NAN, 0.0, 2.0]).view([1, 1, 4]);
    assert!(sel.select(&nan, 2).unwrap_err().to_string().contains("NaN"));
    let mut params = Params::new();
    params.insert("chunk_length", ParamValue::Int(0));
    let err = build_press(PressSpec {
        selector: "chunks",
        compression_ratio: Some(0.5),
        params,
        ..PressSpec::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("chunk_length") && err.contains(">= 1"),
        "{err}"
    );
}

#[test]
fn a_press_with_chunks_keeps_whole_chunks_of_the_store() {
    // knorm scores a token by minus its key's norm: chunks of small keys survive
    let norms: Vec<f32> = (0..12)
        .map(|i| [5.0, 1.0, 3.0, 0.5, 4.0, 2.0][i / 2])
        .collect();
    let keys = Tensor::from_slice(&norms)
        .view([1, 1, 12, 1])
        .expand([1, 2, 12, 4], false)
        .contiguous();
    let mut params = Params::new();
    params.insert("chunk_length", ParamValue::Int(2));
    let press = build_press(PressSpec {
        scorer: "knorm",
        selector: "chunkkv",
        compression_ratio: Some(0.5),
        params,
        ..PressSpec::default()
    })
    .unwrap();
    let mut store = LayerStore::new();
    let _ = store.append(&keys, &keys).unwrap();
    press.compress(&mut store, Plan::prefill(0)).unwrap();
    // chunks by norm: [6,7]=0.5, [2,3]=1, [10,11]=2 kept; 6 of 12 tokens
    let kept = store.keys_view().unwrap().select(3, 0);
    assert_eq!(
        Vec::<f32>::try_from(kept.get(0).get(0)).unwrap(),
        vec![1.0, 1.0, 0.5, 0.5, 2.0, 2.0]
    );
    assert_eq!((store.len(), store.seen()), (6, 12));
}

/// kvpress's EntropyGatedChunkKV, written from its definition with torch ops (float64):
/// chunk means and normalised entropies, lower medians, a greedy pass over chunks by
/// mean where spiky chunks keep `low` tokens, then the best remaining tokens.
fn entropy_reference(per_token: &Tensor, k: i64, chunk: i64, low: i64) -> Vec<i64> {
    let t = per_token.size()[0];
    let n_chunks = (t + chunk - 1) / chunk;
    let mut means = vec![];
    let mut entropies = vec![];
    for c in 0..n_chunks {
        let part = per_token.narrow(0, c * chunk, chunk.min(t - c * chunk));
        means.push(part.mean(Kind::Double).double_value(&[]));
        let m = part.size()[0];
        if m == 1 {
            entropies.push(0.0);
            continue;
        }
        let shifted = &part - part.min().clamp_max(0.0);
        let p = &shifted / (shifted.sum(Kind::Double) + 1e-8);
        let h = -(&p * (&p + 1e-8).log()).sum(Kind::Double).double_value(&[]);
        entropies.push((h / (m as f64).ln()).clamp(0.0, 1.0));
    }
    let lower_median = |v: &Vec<f64>| {
        let (sorted, _) = Tensor::from_slice(v).sort(0, false);
        sorted.double_value(&[(v.len() as i64 - 1) / 2])
    };
    let (score_cut, entropy_cut) = (lower_median(&means), lower_median(&entropies));
    let (_, order) = Tensor::from_slice(&means).sort_stable(true, 0, true);
    let mut keep = vec![false; t as usize];
    let mut budget = k;
    for c in Vec::<i64>::try_from(order).unwrap() {
        if budget <= 0 {
            break;
        }
        let (start, end) = (c * chunk, ((c + 1) * chunk).min(t));
        let mut n = (end - start).min(budget);
        if means[c as usize] >= score_cut && entropies[c as usize] < entropy_cut {
            n = n.min(low);
        }
        let (_, top) = per_token
            .narrow(0, start, end - start)
            .topk(n, 0, true, true);
        for i in Vec::<i64>::try_from(top).unwrap() {
            keep[(start + i) as usize] = true;
        }
        budget -= n;
    }
    if budget > 0 {
        let leftover: Vec<i64> = (0..t).filter(|&i| !keep[i as usize]).collect();
        let idx = Tensor::from_slice(&leftover);
        let (_, top) = per_token.index_select(0, &idx).topk(budget, 0, true, true);
        for i in Vec::<i64>::try_from(top).unwrap() {
            keep[leftover[i as usize] as usize] = true;
        }
    }
    (0..t).filter(|&i| keep[i as usize]).collect()
}

#[test]
fn entropy_gated_chunks_equal_kvpress_definition() {
    tch::manual_seed(11);
    for (heads, t, chunk, low, k) in [
        (2, 120, 10, 4, 60),
        (3, 127, 10, 4, 40),
        (1, 64, 8, 2, 17),
        (4, 301, 10, 4, 75),
    ] {
        // non-negative scores with spikes, as attention-based scorers give
        let scores = Tensor::rand([1, heads, t], (Kind::Double, Device::Cpu)).pow_tensor_scalar(4);
        let per_token = scores
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
            .get(0);
        let expected = entropy_reference(&per_token, k, chunk, low);
        let ours = EntropyChunks {
            chunk_length: chunk as usize,
            low_entropy_length: low as usize,
        }
        .select(&scores, k as usize)
        .unwrap();
        assert_eq!(ours.size(), vec![1, heads, k]);
        for h in 0..heads {
            assert_eq!(
                indices(&ours.get(0).get(h)),
                expected,
                "T {t} chunk {chunk} head {h}"
            );
        }
        // and the same row function on signed scores
        let signed = Tensor::randn([t], (Kind::Double, Device::Cpu));
        let row = Vec::<f64>::try_from(&signed).unwrap();
        assert_eq!(
            entropy_chunk_selection(&row, k as usize, chunk as usize, low as usize),
            entropy_reference(&signed, k, chunk, low)
        );
    }
}

#[test]
fn protected_tokens_survive_a_chunk_cut_to_the_budget() {
    // decoding protects the last 3 tokens (+inf); chunks of 4 would cut [4..8) to fit
    let s = [
        1.0f32,
        1.0,
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
        f32::INFINITY,
        f32::INFINITY,
        f32::INFINITY,
    ];
    let scores = Tensor::from_slice(&s).view([1, 1, 10]);
    let kept = Chunks { chunk_length: 4 }.select(&scores, 5).unwrap();
    assert_eq!(indices(&kept), vec![0, 1, 7, 8, 9]);
    let gated = EntropyChunks {
        chunk_length: 4,
        low_entropy_length: 1,
    };
    let kept = gated.select(&scores, 4).unwrap();
    assert!(indices(&kept).ends_with(&[7, 8, 9]));
}

#[test]
fn entropy_parameters_are_checked() {
    let mut params = Params::new();
    params.insert("entropy_chunk_length", ParamValue::Int(4));
    params.insert("low_entropy_chunk_length", ParamValue::Int(4));
    let err = build_press(PressSpec {
        selector: "entropy_chunks",
        compression_ratio: Some(0.5),
        params,
        ..PressSpec::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("low_entropy_chunk_length") && err.contains("fewer than"),
        "{err}"
    );
}
