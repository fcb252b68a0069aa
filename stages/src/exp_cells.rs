//! How `sdpipe exp show` writes a table's cells: parameter values and metric numbers. The
//! engine's `exp show` and the report kind's Sweep table (which cannot import the engine) both
//! print through these, so the two tables read alike.

use serde_json::Value;

/// A parameter value: strings bare, everything else as JSON.
pub fn value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `x` to `digits` significant digits, without trailing zeros (DVC's `--precision`).
pub fn number(x: f64, digits: usize) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (digits as i32 - 1 - magnitude).max(0) as usize;
    let text = format!("{x:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}
