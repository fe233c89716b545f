//! The libtorch path of quantization (what CUDA tensors take) against the Rust CPU kernels,
//! run on CPU tensors with `tensor::set_cpu_kernels(false)`. The switch is process-wide, so
//! these tests live in their own test binary and take a lock.

mod common;

use common::*;
use kvpress_rs::quant::{Grouping, QuantConfig, QuantizedStore, QuantizedTensor, TensorLayout};
use kvpress_rs::tensor::set_cpu_kernels;
use std::sync::Mutex;
use tch::{Kind, Tensor};

static SWITCH: Mutex<()> = Mutex::new(());

/// Runs `f` with the Rust kernels (`true`) or the libtorch path (`false`).
fn with_path<R>(cpu_kernels: bool, f: impl FnOnce() -> R) -> R {
    // These tests compare results, not speed: one libtorch thread keeps the many small ops
    // fast on a busy machine (torch's thread team otherwise waits on descheduled threads).
    tch::set_num_threads(1);
    set_cpu_kernels(cpu_kernels);
    let r = f();
    set_cpu_kernels(true);
    r
}

fn configs() -> Vec<QuantConfig> {
    let mut out = Vec::new();
    for bits in [2u32, 3, 4, 8] {
        for g in [32usize, 64] {
            let mut c = QuantConfig::new(bits, g, 2 * g).unwrap();
            out.push(c);
            c.hadamard = true;
            c.outlier_fraction = 0.02;
            c.sink_tokens = 3;
            out.push(c);
        }
    }
    out
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

#[test]
fn both_paths_produce_the_same_codes_and_values() {
    let _lock = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    for c in configs() {
        for grouping in [Grouping::Channel, Grouping::Token] {
            // head_dim 224 = 128 + 64 + 32: every block width of the 16-bit channel paths.
            for (kind, d) in [
                (Kind::Float, 64),
                (Kind::Half, 64),
                (Kind::BFloat16, 64),
                (Kind::Half, 224),
                (Kind::BFloat16, 224),
            ] {
                let l = TensorLayout::new(&c, grouping, d as usize);
                if l.check("x").is_err() {
                    continue; // Hadamard at 224, token groups of 64 in 224 channels
                }
                let x = randn(&[2, 3, 128, d], c.bits as u64, kind) * 3.0;
                let rust = with_path(true, || QuantizedTensor::quantize(&x, l, "x").unwrap());
                let torch = with_path(false, || QuantizedTensor::quantize(&x, l, "x").unwrap());
                let what = format!("{c:?} {grouping:?} {kind:?} head_dim {d}");
                assert!(same(rust.codes(), torch.codes()), "codes differ: {what}");
                assert!(
                    same(rust.params(), torch.params()),
                    "scales/zeros differ: {what}"
                );
                match (rust.outliers(), torch.outliers()) {
                    (Some(a), Some(b)) => {
                        assert!(
                            same(&a.0, &b.0) && same(&a.1, &b.1),
                            "outliers differ: {what}"
                        )
                    }
                    (None, None) => {}
                    _ => panic!("outliers present on one path only: {what}"),
                }
                // Each path decodes the other's codes identically.
                let d1 = with_path(true, || rust.dequantize().unwrap());
                let d2 = with_path(false, || rust.dequantize().unwrap());
                assert!(same(&d1, &d2), "dequantized values differ: {what}");
            }
        }
    }
}

#[test]
fn both_paths_attend_alike() {
    let _lock = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    for mut c in configs() {
        for (kg, vg) in [
            (Grouping::Channel, Grouping::Token),
            (Grouping::Token, Grouping::Channel),
        ] {
            c.key_grouping = kg;
            c.value_grouping = vg;
            let mut store = QuantizedStore::new(c).unwrap();
            let k = randn(&[2, 2, 300, 64], 1, Kind::Float);
            let v = randn(&[2, 2, 300, 64], 2, Kind::Float);
            store.append(&k, &v).unwrap();
            for q_len in [1i64, 4] {
                let query = randn(&[2, 6, q_len, 64], 3, Kind::Float);
                let rust = with_path(true, || store.attend(&query, None, 0.125).unwrap());
                let torch = with_path(false, || store.attend(&query, None, 0.125).unwrap());
                let diff = (&rust - &torch).abs().max().double_value(&[]);
                assert!(diff < 2e-5, "{c:?} q_len {q_len}: {diff}");
                let m = Tensor::ones([1, q_len, 300], (Kind::Bool, CPU));
                let _ = m.narrow(2, 0, 10).fill_(0);
                let rust = with_path(true, || store.attend(&query, Some(&m), 0.125).unwrap());
                let torch = with_path(false, || store.attend(&query, Some(&m), 0.125).unwrap());
                let diff = (&rust - &torch).abs().max().double_value(&[]);
                assert!(diff < 2e-5, "{c:?} q_len {q_len} masked: {diff}");
            }
        }
    }
}

#[test]
fn both_paths_raise_the_same_errors() {
    let _lock = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let l = TensorLayout::new(&QuantConfig::new(4, 32, 0).unwrap(), Grouping::Token, 64);
    let big = randn(&[1, 1, 32, 64], 1, Kind::Float) * 1e5;
    let nan = randn(&[1, 1, 32, 64], 1, Kind::Float);
    let _ = nan.get(0).get(0).get(0).get(0).fill_(f64::NAN);
    for cpu in [true, false] {
        with_path(cpu, || {
            expect_err(QuantizedTensor::quantize(&big, l, "x"), "InvalidArgument");
            expect_err(QuantizedTensor::quantize(&nan, l, "x"), "NonFinite");
        });
    }
}
