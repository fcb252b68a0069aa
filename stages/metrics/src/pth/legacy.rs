//! PyTorch's legacy (pre-zip) checkpoint stream.
//!
//! Layout (torch/serialization.py `_legacy_save`): five consecutive pickles — the magic number
//! `0x1950a86a20f9469cfc6c`, the protocol version 1001, a system-info dict (endianness), the
//! saved object, and the list of storage keys — followed by each storage in that key order as a
//! little-endian i64 element count and the raw little-endian elements.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::pickle::{err, materialise, state_dict, unpickle, PickleError, Reader, Value};

const MAGIC: u128 = 0x1950a86a20f9469cfc6c;
const PROTOCOL: i128 = 1001;

/// Decode a legacy checkpoint into named tensors, sorted by name.
pub fn read(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, PickleError> {
    let mut r = Reader { bytes, pos: 0 };
    match unpickle(&mut r)? {
        Value::Int(m) if m as u128 == MAGIC => {}
        _ => return err("not a PyTorch checkpoint (no zip header, no legacy magic number)"),
    }
    match unpickle(&mut r)? {
        Value::Int(PROTOCOL) => {}
        other => return err(format!("unsupported legacy protocol {other:?}")),
    }
    if let Value::Dict(info) = unpickle(&mut r)? {
        let big_endian = info
            .iter()
            .any(|(k, v)| *k == Value::Str("little_endian".into()) && *v == Value::Bool(false));
        if big_endian {
            return err("big-endian checkpoints are not supported");
        }
    }
    let tensors = state_dict(unpickle(&mut r)?)?;
    let Value::List(keys) = unpickle(&mut r)? else {
        return err("storage key list missing");
    };
    // The raw storages follow in key order, each as an i64 element count and the elements.
    let dtypes: HashMap<&str, DType> =
        tensors.iter().map(|(_, t)| (t.storage.key.as_str(), t.storage.dtype)).collect();
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    for key in &keys {
        let Value::Str(key) = key else { return err("storage key is not a string") };
        let numel = i64::from_le_bytes(r.le()?);
        let Some(&dtype) = dtypes.get(key.as_str()) else {
            return err(format!("storage {key} is not used by any tensor"));
        };
        let n = usize::try_from(numel).map_err(|_| PickleError("negative storage size".into()))?;
        storages.insert(key.clone(), r.take(n * dtype.size_in_bytes())?);
    }
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let raw = storages
            .get(&t.storage.key)
            .ok_or_else(|| PickleError(format!("storage {} of `{name}` missing", t.storage.key)))?;
        out.push((name.clone(), materialise(&name, &t, raw)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_without_the_magic_number_is_rejected() {
        // Protocol-2 pickle of the integer 7.
        let e = read(b"\x80\x02K\x07.").err().unwrap().to_string();
        assert!(e.contains("not a PyTorch checkpoint"), "{e}");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let e = read(b"\x80\x02\x8a\x0a\x6c\xfc").err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
