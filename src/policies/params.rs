//! Keyword parameters as users give them (`window_size=32`): a map from name to value,
//! routed to the stages that declare them by [`crate::registry::build_press`], which checks
//! each value against its declared type and range.

use std::collections::BTreeMap;

/// One keyword argument's value.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// A list of numbers (per-layer ratios, say).
    Floats(Vec<f64>),
}

/// The keyword parameters of a press, not yet routed to its stages.
///
/// ```
/// use kvpress_rs::policies::{Params, ParamValue};
/// let mut p = Params::from_pairs([("window_size".to_string(), ParamValue::Int(32))]);
/// assert_eq!(p.take("window_size"), Some(ParamValue::Int(32)));
/// assert_eq!(p.first_name(), None);
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

    /// Removes and returns the parameter `name`.
    pub fn take(&mut self, name: &str) -> Option<ParamValue> {
        self.0.remove(name)
    }

    /// The first parameter left (alphabetically), if any.
    pub fn first_name(&self) -> Option<String> {
        self.0.keys().next().cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
