//! The subset of Python's pickle machine that PyTorch state dicts use, and the step from the
//! unpickled object to named tensors.
//!
//! In a state-dict pickle a storage is a persistent id
//! `("storage", torch.FloatStorage, key, location, numel[, view])` (where its bytes live is the
//! container's business) and a tensor is
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, possibly wrapped in
//! `_rebuild_parameter`. The machine builds plain values; memoised containers are copied when
//! fetched, which is exact for state dicts (they never mutate a container after referencing it
//! twice).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

/// Why a pickle (or the tensors it describes) could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PickleError(pub String);

pub(super) fn err<T>(message: impl Into<String>) -> Result<T, PickleError> {
    Err(PickleError(message.into()))
}

/// A pickled value, as far as state dicts need.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)` we do not interpret.
    Call {
        callable: Box<Value>,
        args: Box<Value>,
    },
    Storage(StorageRef),
    Tensor(TensorRef),
    Mark,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct StorageRef {
    pub key: String,
    pub dtype: DType,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A cursor over the stream.
pub(super) struct Reader<'a> {
    pub bytes: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        if self.bytes.len() - self.pos < n {
            return err(format!("truncated at byte {} (wanted {n} more bytes)", self.pos));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    pub fn le<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.bytes[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or(PickleError("no newline".into()))?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).trim_end_matches('\r').to_string())
    }
    fn string(&mut self, n: usize) -> Result<String, PickleError> {
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

/// Run one pickle from the reader's position to its STOP opcode.
pub(super) fn unpickle(r: &mut Reader<'_>) -> Result<Value, PickleError> {
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u64, Value> = HashMap::new();
    fn pop(stack: &mut Vec<Value>) -> Result<Value, PickleError> {
        stack.pop().ok_or(PickleError("pickle stack underflow".into()))
    }
    fn pop_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>, PickleError> {
        let at = stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or(PickleError("pickle MARK missing".into()))?;
        let items = stack.split_off(at + 1);
        stack.pop();
        Ok(items)
    }
    fn top(stack: &mut [Value]) -> Result<&mut Value, PickleError> {
        stack.last_mut().ok_or(PickleError("pickle stack underflow".into()))
    }
    fn set_items(target: &mut Value, items: Vec<Value>) -> Result<(), PickleError> {
        let Value::Dict(entries) = target else {
            return err(format!("SETITEMS on a non-dict {target:?}"));
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            entries.push((k, v));
        }
        Ok(())
    }
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO n
            }
            0x95 => {
                r.take(8)?; // FRAME length
            }
            b'.' => return pop(&mut stack),
            b'(' => stack.push(Value::Mark),
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'2' => {
                let v = top(&mut stack)?.clone();
                stack.push(v);
            }
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => stack.push(Value::Int(i32::from_le_bytes(r.le()?) as i128)),
            b'K' => stack.push(Value::Int(r.u8()? as i128)),
            b'M' => stack.push(Value::Int(u16::from_le_bytes(r.le()?) as i128)),
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    r.u8()? as usize
                } else {
                    u32::from_le_bytes(r.le()?) as usize
                };
                if n > 16 {
                    return err(format!("integer of {n} bytes is too large"));
                }
                let bytes = r.take(n)?;
                let mut v: i128 = 0;
                for (i, &b) in bytes.iter().enumerate() {
                    v |= (b as i128) << (8 * i);
                }
                if n > 0 && n < 16 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1i128 << (8 * n); // two's complement
                }
                stack.push(Value::Int(v));
            }
            b'G' => stack.push(Value::Float(f64::from_be_bytes(r.le()?))),
            b'U' => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'T' | b'X' => {
                let n = u32::from_le_bytes(r.le()?) as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8d => {
                let n = u64::from_le_bytes(r.le()?) as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'B' => {
                let n = u32::from_le_bytes(r.le()?) as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b')' => stack.push(Value::Tuple(vec![])),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return err("pickle stack underflow in TUPLEn");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b']' => stack.push(Value::List(vec![])),
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::List(items));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match top(&mut stack)? {
                    Value::List(items) => items.push(v),
                    other => return err(format!("APPEND to a non-list {other:?}")),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match top(&mut stack)? {
                    Value::List(list) => list.extend(items),
                    other => return err(format!("APPENDS to a non-list {other:?}")),
                }
            }
            b'}' => stack.push(Value::Dict(vec![])),
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let mut dict = Value::Dict(vec![]);
                set_items(&mut dict, items)?;
                stack.push(dict);
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(top(&mut stack)?, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                set_items(top(&mut stack)?, items)?;
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global { module, name });
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => {
                        stack.push(Value::Global { module, name })
                    }
                    _ => return err("STACK_GLOBAL needs two strings"),
                }
            }
            b'q' => {
                let id = r.u8()? as u64;
                memo.insert(id, top(&mut stack)?.clone());
            }
            b'r' => {
                let id = u32::from_le_bytes(r.le()?) as u64;
                memo.insert(id, top(&mut stack)?.clone());
            }
            0x94 => {
                let id = memo.len() as u64;
                memo.insert(id, top(&mut stack)?.clone());
            }
            b'p' => {
                let id: u64 = r.line()?.parse().map_err(|_| PickleError("bad PUT id".into()))?;
                memo.insert(id, top(&mut stack)?.clone());
            }
            b'h' | b'j' | b'g' => {
                let id = match op {
                    b'h' => r.u8()? as u64,
                    b'j' => u32::from_le_bytes(r.le()?) as u64,
                    _ => r.line()?.parse().map_err(|_| PickleError("bad GET id".into()))?,
                };
                let v = memo.get(&id).cloned().ok_or(PickleError(format!("memo {id} unset")))?;
                stack.push(v);
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(call(callable, args)?);
            }
            b'b' => {
                // BUILD: object state (OrderedDict `_metadata`, Parameter attributes): a state
                // dict's tensors never depend on it.
                pop(&mut stack)?;
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent_load(pid)?);
            }
            other => {
                return err(format!(
                    "unsupported pickle opcode 0x{other:02x} at byte {}",
                    r.pos - 1
                ))
            }
        }
    }
}

/// REDUCE / NEWOBJ: the calls state dicts make, interpreted; anything else kept as a call.
fn call(callable: Value, args: Value) -> Result<Value, PickleError> {
    let Value::Global { module, name } = &callable else {
        return Ok(Value::Call { callable: Box::new(callable), args: Box::new(args) });
    };
    let args_vec = match &args {
        Value::Tuple(items) => items.clone(),
        _ => vec![],
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") => {
            // Python 3 pickles `OrderedDict()` and then SETITEMS; Python 2 passes the items as
            // a list of [key, value] pairs.
            let mut entries = Vec::new();
            if let Some(Value::List(pairs)) = args_vec.first() {
                for pair in pairs {
                    match pair {
                        Value::List(kv) | Value::Tuple(kv) if kv.len() == 2 => {
                            entries.push((kv[0].clone(), kv[1].clone()))
                        }
                        other => return err(format!("odd OrderedDict item {other:?}")),
                    }
                }
            }
            Ok(Value::Dict(entries))
        }
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let [storage, offset, size, stride, ..] = args_vec.as_slice() else {
                return err(format!("{name} with too few arguments"));
            };
            let Value::Storage(storage) = storage else {
                return err(format!("{name} without a storage"));
            };
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: as_usize(offset)?,
                shape: as_usizes(size)?,
                stride: as_usizes(stride)?,
            }))
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => match args_vec.first() {
            Some(tensor @ Value::Tensor(_)) => Ok(tensor.clone()),
            _ => err("a Parameter without a tensor"),
        },
        _ => Ok(Value::Call { callable: Box::new(callable), args: Box::new(args) }),
    }
}

fn as_usize(v: &Value) -> Result<usize, PickleError> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => err(format!("expected a non-negative integer, got {other:?}")),
    }
}

fn as_usizes(v: &Value) -> Result<Vec<usize>, PickleError> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(as_usize).collect(),
        other => err(format!("expected a tuple of integers, got {other:?}")),
    }
}

fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ByteStorage" => DType::U8,
        _ => return None,
    })
}

/// `("storage", torch.XStorage, key, location, numel[, view_metadata])`.
fn persistent_load(pid: Value) -> Result<Value, PickleError> {
    let Value::Tuple(items) = &pid else {
        return err(format!("unexpected persistent id {pid:?}"));
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global { name, .. }, Value::Str(key), _location, _numel, rest @ ..]
            if tag == "storage" =>
        {
            if let Some(view) = rest.first().filter(|v| **v != Value::None) {
                return err(format!("storage views ({view:?}) are not supported"));
            }
            let dtype = storage_dtype(name)
                .ok_or_else(|| PickleError(format!("unsupported storage type {name}")))?;
            Ok(Value::Storage(StorageRef { key: key.clone(), dtype }))
        }
        _ => err(format!("unexpected persistent id {pid:?}")),
    }
}

/// The state dict inside the saved object: the object itself, or its `state_dict` entry.
pub(super) fn state_dict(obj: Value) -> Result<Vec<(String, TensorRef)>, PickleError> {
    let Value::Dict(entries) = obj else {
        return err("the saved object is not a dict of tensors");
    };
    let mut tensors = Vec::new();
    let mut nested = None;
    for (k, v) in entries {
        match (k, v) {
            (Value::Str(name), Value::Tensor(t)) => tensors.push((name, t)),
            (Value::Str(name), dict @ Value::Dict(_)) if name == "state_dict" => {
                nested = Some(dict)
            }
            _ => {}
        }
    }
    match (tensors.is_empty(), nested) {
        (true, Some(dict)) => state_dict(dict),
        _ => Ok(tensors),
    }
}

/// Copy a (possibly strided, offset) view of a raw storage into a contiguous tensor.
pub(super) fn materialise(name: &str, t: &TensorRef, raw: &[u8]) -> Result<Tensor, PickleError> {
    let size = t.storage.dtype.size_in_bytes();
    let numel: usize = t.shape.iter().product();
    if t.shape.len() != t.stride.len() {
        return err(format!("`{name}`: shape and stride ranks differ"));
    }
    let to_tensor = |bytes: &[u8]| {
        Tensor::from_raw_buffer(bytes, t.storage.dtype, &t.shape, &Device::Cpu)
            .map_err(|e| PickleError(format!("`{name}`: {e}")))
    };
    // Row-major contiguous (the usual case): one slice copy. Size-1 dims have any stride.
    let mut expected = 1;
    let contiguous = t.shape.iter().zip(&t.stride).rev().all(|(&dim, &stride)| {
        let ok = dim == 1 || stride == expected;
        expected *= dim;
        ok
    });
    if contiguous {
        let (start, end) = (t.offset * size, (t.offset + numel) * size);
        let slice = raw
            .get(start..end)
            .ok_or_else(|| PickleError(format!("`{name}` reaches past its storage")))?;
        return to_tensor(slice);
    }
    // A strided view: gather element by element.
    let mut bytes = Vec::with_capacity(numel * size);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let element = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
        let at = element * size;
        let chunk = raw
            .get(at..at + size)
            .ok_or_else(|| PickleError(format!("`{name}` reaches past its storage")))?;
        bytes.extend_from_slice(chunk);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    to_tensor(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_long1_integers_decode_in_twos_complement() {
        let mut r = Reader { bytes: b"\x8a\x01\xff.", pos: 0 };
        assert_eq!(unpickle(&mut r).unwrap(), Value::Int(-1));
    }

    #[test]
    fn an_unknown_opcode_is_an_error_with_its_position() {
        let mut r = Reader { bytes: b"\x80\x02\xfe", pos: 0 };
        let e = unpickle(&mut r).unwrap_err().to_string();
        assert!(e.contains("0xfe") && e.contains("byte 2"), "{e}");
    }

    #[test]
    fn a_view_reaching_past_its_storage_is_an_error_not_a_panic() {
        let t = TensorRef {
            storage: StorageRef { key: "0".into(), dtype: DType::F32 },
            offset: 1,
            shape: vec![2],
            stride: vec![1],
        };
        let e = materialise("w", &t, &[0u8; 8]).unwrap_err().to_string();
        assert!(e.contains("past its storage"), "{e}");
    }
}
