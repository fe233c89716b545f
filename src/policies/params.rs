//! Keyword parameters of the policies, as users give them (`window_size=32`), checked
//! against what each policy accepts.

use crate::error::{KvError, Result};
use std::collections::BTreeMap;

/// One keyword argument's value.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

/// The keyword parameters of a policy. Each `take_*` consumes one with a default;
/// [`Params::finish`] rejects any left over, naming the ones the policy accepts.
///
/// ```
/// use kvpress_rs::policies::{Params, ParamValue};
/// let mut p = Params::from_pairs([("window_size".to_string(), ParamValue::Int(32))]);
/// assert_eq!(p.take_usize("window_size", 64).unwrap(), 32);
/// assert_eq!(p.take_usize("kernel_size", 5).unwrap(), 5);
/// p.finish("snapkv", &["window_size", "kernel_size"]).unwrap();
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params(BTreeMap<String, ParamValue>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, ParamValue)>) -> Self {
        Params(pairs.into_iter().collect())
    }

    pub fn insert(&mut self, name: &str, value: ParamValue) {
        self.0.insert(name.to_owned(), value);
    }

    pub fn take_f64(&mut self, name: &str, default: f64) -> Result<f64> {
        match self.0.remove(name) {
            None => Ok(default),
            Some(ParamValue::Float(x)) if x.is_finite() => Ok(x),
            Some(ParamValue::Int(x)) => Ok(x as f64),
            Some(other) => Err(KvError::invalid(
                name,
                format!("got {other:?}, expected a finite number"),
            )),
        }
    }

    pub fn take_i64(&mut self, name: &str, default: i64) -> Result<i64> {
        match self.0.remove(name) {
            None => Ok(default),
            Some(ParamValue::Int(x)) => Ok(x),
            Some(other) => Err(KvError::invalid(
                name,
                format!("got {other:?}, expected an integer"),
            )),
        }
    }

    pub fn take_usize(&mut self, name: &str, default: usize) -> Result<usize> {
        let x = self.take_i64(name, default as i64)?;
        usize::try_from(x)
            .map_err(|_| KvError::invalid(name, format!("got {x}, expected an integer >= 0")))
    }

    pub fn take_bool(&mut self, name: &str, default: bool) -> Result<bool> {
        match self.0.remove(name) {
            None => Ok(default),
            Some(ParamValue::Bool(x)) => Ok(x),
            Some(other) => Err(KvError::invalid(
                name,
                format!("got {other:?}, expected True or False"),
            )),
        }
    }

    pub fn take_str(&mut self, name: &str, default: &str) -> Result<String> {
        match self.0.remove(name) {
            None => Ok(default.to_owned()),
            Some(ParamValue::Str(x)) => Ok(x),
            Some(other) => Err(KvError::invalid(
                name,
                format!("got {other:?}, expected a string"),
            )),
        }
    }

    /// Fails if any parameter was not consumed.
    pub fn finish(self, policy: &str, accepted: &[&str]) -> Result<()> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(name) => Err(KvError::invalid(
                name.as_str(),
                format!("is not a parameter of policy {policy:?}; it accepts {accepted:?}"),
            )),
        }
    }
}
