//! Token budgets: kept counts with Python's `int(T * (1 - r))` semantics, and invalid budgets.

mod common;

use common::*;
use kvpress_rs::{Budget, KvError};

#[test]
fn ratio_keeps_int_of_t_times_one_minus_r() {
    // Expected counts are Python's `int(T * (1 - r))` in IEEE doubles, worked out by hand
    // (the float product in brackets); several differ from the exact rational floor.
    let table: [(usize, f64, usize); 17] = [
        (10, 0.5, 5),     // 5.0
        (7, 0.3, 4),      // 4.8999999999999995
        (20, 0.9, 1),     // 1.9999999999999996 (exact math: 2)
        (100, 0.7, 30),   // 30.000000000000004
        (10, 0.1, 9),     // 9.0
        (10, 0.3, 7),     // 7.0
        (1000, 0.999, 1), // 1.0000000000000009
        (1, 0.0, 1),      // 1.0
        (2, 0.5, 1),      // 1.0
        (29, 0.25, 21),   // 21.75
        (33, 0.333, 22),  // 22.011000000000003
        (64, 0.875, 8),   // 8.0
        (5, 0.2, 4),      // 4.0
        (3, 0.1, 2),      // 2.7
        (6, 0.7, 1),      // 1.8000000000000003
        (17, 0.7, 5),     // 5.1000000000000005
        (1000, 0.1, 900), // 900.0
    ];
    for (t, r, want) in table {
        let budget = Budget::ratio(r).unwrap();
        assert_eq!(budget, Budget::Ratio(r));
        assert_eq!(budget.n_kept(t).unwrap(), want, "T = {t}, r = {r}");
        assert_eq!(
            Budget::from_args(Some(r), None).unwrap().n_kept(t).unwrap(),
            want
        );
    }
}

#[test]
fn a_ratio_that_keeps_no_token_is_an_error() {
    // int(3 * 0.09999999999999998) = 0, int(10 * (1 - 0.9)) = int(0.9999999999999998) = 0.
    for (t, r) in [(3, 0.9), (10, 0.9), (1, 0.5), (1, 0.999), (99, 0.99)] {
        let e = expect_err(Budget::ratio(r).unwrap().n_kept(t), "InvalidArgument");
        assert!(
            matches!(&e, KvError::InvalidArgument { argument, .. } if argument == "compression_ratio"),
            "{e}"
        );
    }
    // One more token and it keeps one: int(100 * 0.010000000000000009) = 1.
    assert_eq!(Budget::ratio(0.99).unwrap().n_kept(100).unwrap(), 1);
}

#[test]
fn ratio_zero_keeps_everything() {
    for t in [1, 2, 7, 1000] {
        assert_eq!(Budget::ratio(0.0).unwrap().n_kept(t).unwrap(), t);
        assert_eq!(Budget::from_args(None, None).unwrap().n_kept(t).unwrap(), t);
    }
    assert_eq!(Budget::from_args(None, None).unwrap(), Budget::Ratio(0.0));
    assert!(Budget::ratio(0.0).unwrap().keeps_everything());
    assert!(!Budget::ratio(1e-9).unwrap().keeps_everything());
    assert!(!Budget::max_tokens(i64::MAX).unwrap().keeps_everything());
}

#[test]
fn invalid_ratios_are_errors() {
    for r in [
        -0.1,
        -1e-12,
        1.0,
        1.0 + 1e-12,
        1.5,
        100.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        let e = expect_err(Budget::ratio(r), "InvalidArgument");
        assert!(
            matches!(&e, KvError::InvalidArgument { argument, .. } if argument == "compression_ratio"),
            "{e}"
        );
        expect_err(Budget::from_args(Some(r), None), "InvalidArgument");
    }
    // Just below 1 is valid (and keeps one token of a long enough sequence).
    let almost_one = 1.0 - f64::EPSILON;
    assert_eq!(
        Budget::ratio(almost_one).unwrap().n_kept(1 << 52).unwrap(),
        1
    );
}

#[test]
fn max_tokens_keeps_min_of_n_and_t() {
    let table: [(i64, usize, usize); 7] = [
        (1, 1, 1),
        (1, 50, 1),
        (4, 10, 4),
        (10, 10, 10),
        (11, 10, 10),
        (1000, 3, 3),
        (i64::MAX, 7, 7),
    ];
    for (n, t, want) in table {
        let budget = Budget::max_tokens(n).unwrap();
        assert_eq!(budget, Budget::MaxTokens(n as usize));
        assert_eq!(budget.n_kept(t).unwrap(), want, "n = {n}, T = {t}");
        assert_eq!(
            Budget::from_args(None, Some(n)).unwrap().n_kept(t).unwrap(),
            want
        );
        assert_eq!(Budget::MaxTokens(n as usize).n_kept(t).unwrap(), want);
    }
}

#[test]
fn non_positive_max_tokens_is_an_error() {
    for n in [0, -1, -4096, i64::MIN] {
        let e = expect_err(Budget::max_tokens(n), "InvalidArgument");
        assert!(
            matches!(&e, KvError::InvalidArgument { argument, .. } if argument == "max_tokens"),
            "{e}"
        );
        expect_err(Budget::from_args(None, Some(n)), "InvalidArgument");
    }
}

#[test]
fn giving_both_a_ratio_and_max_tokens_is_an_error() {
    expect_err(Budget::from_args(Some(0.5), Some(4)), "InvalidArgument");
    expect_err(Budget::from_args(Some(0.0), Some(1)), "InvalidArgument");
}

#[test]
fn zero_tokens_cannot_be_budgeted() {
    for budget in [Budget::Ratio(0.0), Budget::Ratio(0.5), Budget::MaxTokens(4)] {
        expect_err(budget.n_kept(0), "Empty");
    }
}
