//! Validation errors that name the offending field, and small checked-parameter helpers.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A bad intervention parameter: `field` is a path inside the request (`interventions[0].gamma`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InterventionError {
    pub field: String,
    pub message: String,
}

impl InterventionError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field with the position in the request's list.
    pub fn at_index(mut self, index: usize) -> Self {
        self.field = if self.field.is_empty() {
            format!("interventions[{index}]")
        } else {
            format!("interventions[{index}].{}", self.field)
        };
        self
    }
}

/// Deserializes parameters, turning serde's message into one that names the field.
pub(crate) fn from_value<T: DeserializeOwned>(params: Value) -> Result<T, InterventionError> {
    serde_json::from_value(params).map_err(|e| {
        let msg = e.to_string();
        // serde names unknown and missing fields in backticks; use that as the field.
        let field = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"))
            .unwrap_or("")
            .to_string();
        InterventionError::new(field, msg)
    })
}

/// Checks that every index in `list` is below `limit`.
pub(crate) fn check_indices(
    field: &str,
    list: &[usize],
    limit: usize,
    what: &str,
) -> Result<(), InterventionError> {
    match list.iter().find(|&&i| i >= limit) {
        Some(bad) => Err(InterventionError::new(
            field,
            format!(
                "{what} {bad} does not exist (the model has {limit}: 0..{})",
                limit - 1
            ),
        )),
        None => Ok(()),
    }
}

/// Checks `lo <= value <= hi` (or `lo < value` with `open_below`), naming the field otherwise.
pub(crate) fn check_range(
    field: &str,
    value: f64,
    lo: f64,
    hi: f64,
    open_below: bool,
) -> Result<(), InterventionError> {
    let above = if open_below { value > lo } else { value >= lo };
    if above && value <= hi {
        return Ok(());
    }
    let open = if open_below { "(" } else { "[" };
    Err(InterventionError::new(
        field,
        format!("must be in {open}{lo}, {hi}] (got {value})"),
    ))
}
