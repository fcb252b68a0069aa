//! Weight files read as hostile input: every tensor's name, dtype and shape from the files'
//! headers first (no tensor data), then one tensor's bytes at a time, on demand.
//!
//! A safetensors header is checked here with safetensors' own rules (a header length within the
//! file and under the format's 100 MB limit, JSON, every tensor's byte range equal to its
//! shape × dtype size, the ranges tiling the data section exactly, in order) so that a file that
//! lies is refused before anything is read or allocated from its numbers, with a message that
//! names the tensor and the numbers that disagree (safetensors' own errors name neither). A
//! PyTorch pickle (`.bin`) is read with candle's reader, which reads the pickled metadata only;
//! a tensor claiming more bytes than the whole file is refused before its data is read.
//!
//! Model loaders compare these shapes with what their config implies *before* loading anything
//! (see [`crate::UNet`]'s loaders, and sdpipe-diffusion's checks of the VAE and text encoder), so
//! a config that disagrees with its weights costs a header read, never an allocation.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::UNetError;
use crate::params::is_pickle;

/// safetensors' limit on the header (`MAX_HEADER_SIZE` in the `safetensors` crate).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor as a weight file describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub shape: Vec<usize>,
    /// The dtype, or `Err(name)` for one candle cannot load (the name as the file writes it).
    pub dtype: Result<DType, String>,
    /// Index into [`WeightFiles::paths`] of the file that holds it.
    pub file: usize,
    /// Where its bytes are (safetensors: absolute byte range in the file).
    location: Location,
}

#[derive(Debug, Clone, PartialEq)]
enum Location {
    Bytes { start: u64, len: usize },
    Pickle,
}

/// The tensors of one state dict: one weight file, or the shards of one.
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    tensors: HashMap<String, StoredTensor>,
    /// Each file's safetensors `__metadata__` (its string entries; empty for pickles).
    metadata: Vec<HashMap<String, String>>,
    /// The candle reader of each pickle file (by file index), for loading.
    pickles: HashMap<usize, candle_core::pickle::PthTensors>,
}

impl std::fmt::Debug for WeightFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFiles")
            .field("paths", &self.paths)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn weights_error(path: &Path, message: String) -> UNetError {
    UNetError::Weights { path: path.to_path_buf(), message }
}

impl WeightFiles {
    /// Reads the headers of `paths` (safetensors, or PyTorch pickles by extension); a tensor
    /// found in two of them is an error. No tensor data is read.
    pub fn open(paths: &[PathBuf]) -> Result<WeightFiles, UNetError> {
        if paths.is_empty() {
            return Err(UNetError::Input("no weights file given".into()));
        }
        let mut files = WeightFiles {
            paths: paths.to_vec(),
            tensors: HashMap::new(),
            metadata: Vec::with_capacity(paths.len()),
            pickles: HashMap::new(),
        };
        for (index, path) in paths.iter().enumerate() {
            if !path.is_file() {
                return Err(weights_error(path, "weights file not found".into()));
            }
            let found = if is_pickle(path) {
                let (found, reader) = read_pickle(path, index)?;
                files.pickles.insert(index, reader);
                files.metadata.push(HashMap::new());
                found
            } else {
                let (tensors, metadata) = parse_safetensors_header(path).map_err(|m| {
                    weights_error(path, format!("not a readable safetensors file: {m}"))
                })?;
                files.metadata.push(metadata);
                tensors
                    .into_iter()
                    .map(|(name, mut t)| {
                        t.file = index;
                        (name, t)
                    })
                    .collect()
            };
            for (name, tensor) in found {
                if files.tensors.insert(name.clone(), tensor).is_some() {
                    return Err(weights_error(
                        path,
                        format!("tensor `{name}` is also in another shard of the same weights"),
                    ));
                }
            }
        }
        Ok(files)
    }

    /// The files, in the order given.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> &HashMap<String, StoredTensor> {
        &self.tensors
    }

    /// The string entries of file `index`'s safetensors `__metadata__` (none for a pickle).
    pub fn metadata(&self, index: usize) -> &HashMap<String, String> {
        &self.metadata[index]
    }

    /// The shape the files give tensor `name`, if they hold it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Reads tensor `name`'s data, in its stored dtype, on the CPU.
    pub fn load(&self, name: &str) -> Result<Tensor, UNetError> {
        let tensor = self.tensors.get(name).ok_or_else(|| {
            weights_error(&self.paths[0], format!("no tensor `{name}` in the weights"))
        })?;
        let path = &self.paths[tensor.file];
        let error = |message: String| weights_error(path, format!("tensor `{name}`: {message}"));
        match &tensor.location {
            Location::Pickle => {
                let reader = &self.pickles[&tensor.file];
                reader
                    .get(name)
                    .map_err(|e| error(e.to_string()))?
                    .ok_or_else(|| error("not in the file".into()))
            }
            Location::Bytes { start, len } => {
                let dtype = tensor.dtype.clone().map_err(|d| error(format!("dtype {d}")))?;
                let mut file = File::open(path).map_err(|e| error(e.to_string()))?;
                let mut bytes = vec![0u8; *len];
                file.seek(SeekFrom::Start(*start))
                    .and_then(|_| file.read_exact(&mut bytes))
                    .map_err(|e| error(format!("reading its data: {e}")))?;
                Tensor::from_raw_buffer(&bytes, dtype, &tensor.shape, &Device::Cpu)
                    .map_err(|e| error(e.to_string()))
            }
        }
    }
}

/// A tensor entry of a safetensors header.
#[derive(Deserialize)]
struct HeaderEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// The tensors a safetensors file's header describes, checked against the file's size; the
/// error says what is wrong (without the path: the caller adds it).
pub fn read_safetensors_header(path: &Path) -> Result<HashMap<String, StoredTensor>, String> {
    parse_safetensors_header(path).map(|(tensors, _)| tensors)
}

/// A safetensors header's tensors and the string entries of its `__metadata__`.
type Header = (HashMap<String, StoredTensor>, HashMap<String, String>);

/// [`read_safetensors_header`] and the string entries of the header's `__metadata__` (the
/// format allows only strings there; anything else is ignored, as before metadata was read).
fn parse_safetensors_header(path: &Path) -> Result<Header, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len < 8 {
        return Err(format!(
            "{len} bytes, too short: a safetensors file starts with an 8-byte header length"
        ));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES {
        return Err(format!(
            "its header length field says {n} bytes, over safetensors' limit of {MAX_HEADER_BYTES}: \
             a corrupt file, or not safetensors"
        ));
    }
    if n > len - 8 {
        return Err(format!(
            "its header length field says {n} bytes but only {} follow: truncated, or not \
             safetensors",
            len - 8
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header = std::str::from_utf8(&header).map_err(|_| "its header is not UTF-8 text")?;
    let entries: serde_json::Map<String, Value> = serde_json::from_str(header)
        .map_err(|e| format!("its header is not a JSON object: {e}"))?;
    let data_start = 8 + n;
    let data_len = len - data_start;
    let mut tensors: Vec<(String, HeaderEntry)> = Vec::with_capacity(entries.len());
    let mut metadata = HashMap::new();
    for (name, value) in entries {
        if name == "__metadata__" {
            if let Value::Object(map) = value {
                metadata.extend(map.into_iter().filter_map(|(k, v)| match v {
                    Value::String(v) => Some((k, v)),
                    _ => None,
                }));
            }
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| format!("tensor `{name}` in the header: {e}"))?;
        tensors.push((name, entry));
    }
    tensors.sort_by_key(|(_, e)| e.data_offsets);
    let mut end_of_previous = 0u64;
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, e) in tensors {
        let (begin, end) = e.data_offsets;
        let bytes = e
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(e.dtype.bitsize()))
            .filter(|bits| bits % 8 == 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| {
                format!(
                    "tensor `{name}`: shape {:?} of {} is not a whole number of bytes a \
                     computer can address",
                    e.shape, e.dtype
                )
            })?;
        if end < begin || (end - begin) as u128 != bytes as u128 {
            return Err(format!(
                "tensor `{name}`: shape {:?} of {} is {bytes} bytes, but its data_offsets \
                 [{begin}, {end}] say otherwise",
                e.shape, e.dtype
            ));
        }
        if begin != end_of_previous {
            return Err(format!(
                "tensor `{name}`: its data starts at byte {begin} of the data section, where the \
                 tensor before it ends at {end_of_previous}: overlapping or gapped data, a \
                 corrupt header"
            ));
        }
        end_of_previous = end;
        if end > data_len {
            return Err(format!(
                "tensor `{name}` ends at byte {end} of the data section, but the file holds \
                 {data_len} bytes of data: truncated, or a lying header"
            ));
        }
        let dtype = DType::try_from(e.dtype).map_err(|_| e.dtype.to_string());
        let location = Location::Bytes { start: data_start + begin, len: bytes };
        out.insert(name, StoredTensor { shape: e.shape, dtype, file: 0, location });
    }
    if end_of_previous != data_len {
        return Err(format!(
            "the header's tensors hold {end_of_previous} bytes of data but the file has \
             {data_len}: bytes no tensor accounts for"
        ));
    }
    Ok((out, metadata))
}

/// The tensors of a PyTorch pickle, with candle's lazy reader of the file.
fn read_pickle(
    path: &Path,
    index: usize,
) -> Result<(Vec<(String, StoredTensor)>, candle_core::pickle::PthTensors), UNetError> {
    let error = |message: String| weights_error(path, message);
    let reader = candle_core::pickle::PthTensors::new(path, None)
        .map_err(|e| error(format!("not a readable PyTorch state dict: {e}")))?;
    let len = std::fs::metadata(path).map_err(|e| error(e.to_string()))?.len();
    let mut found = Vec::with_capacity(reader.tensor_infos().len());
    for (name, info) in reader.tensor_infos() {
        let shape = info.layout.dims().to_vec();
        let bytes = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes()));
        // torch.save stores tensor data uncompressed: no tensor is bigger than its file.
        if bytes.is_none_or(|b| b as u64 > len) {
            return Err(error(format!(
                "tensor `{name}`: shape {shape:?} of {:?} needs more bytes than the whole file \
                 ({len}): a corrupt or lying file",
                info.dtype
            )));
        }
        found.push((
            name.clone(),
            StoredTensor { shape, dtype: Ok(info.dtype), file: index, location: Location::Pickle },
        ));
    }
    Ok((found, reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of `header` (JSON) with `data` bytes after it; `length` overrides the
    /// header length field.
    fn forge(dir: &Path, header: &str, data: usize, length: Option<u64>) -> PathBuf {
        let path = dir.join("w.safetensors");
        let mut bytes = length.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(vec![0u8; data]);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn refusal(header: &str, data: usize, length: Option<u64>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = forge(dir.path(), header, data, length);
        let error = WeightFiles::open(std::slice::from_ref(&path)).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "names the file: {error}");
        error
    }

    const ONE: &str = r#"{"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}"#;

    #[test]
    fn a_well_formed_file_gives_shapes_and_loads_one_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a", t.clone())]), &path).unwrap();
        let files = WeightFiles::open(&[path]).unwrap();
        assert_eq!(files.shape("a"), Some(&[2usize, 3][..]));
        let loaded = files.load("a").unwrap();
        assert_eq!(loaded.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn a_header_length_over_the_format_limit_is_refused() {
        let error = refusal(ONE, 24, Some(u64::MAX));
        assert!(error.contains("header length field says 18446744073709551615"), "{error}");
    }

    #[test]
    fn a_header_length_past_the_end_of_the_file_is_refused() {
        let error = refusal(ONE, 24, Some(1000));
        assert!(error.contains("says 1000 bytes but only"), "{error}");
    }

    #[test]
    fn a_file_shorter_than_the_length_field_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        std::fs::write(&path, b"\x01\x02").unwrap();
        let error = WeightFiles::open(&[path]).unwrap_err().to_string();
        assert!(error.contains("2 bytes, too short"), "{error}");
    }

    #[test]
    fn a_header_that_is_not_json_is_refused() {
        let error = refusal("{not json", 0, None);
        assert!(error.contains("not a JSON object"), "{error}");
    }

    #[test]
    fn a_shape_whose_size_disagrees_with_the_offsets_is_refused_naming_the_tensor() {
        let header = r#"{"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}"#;
        let error = refusal(header, 20, None);
        assert!(error.contains("tensor `a`: shape [2, 3] of F32 is 24 bytes"), "{error}");
    }

    #[test]
    fn a_shape_whose_size_overflows_is_refused() {
        let header = format!(
            r#"{{"a": {{"dtype": "F32", "shape": [{m}, {m}], "data_offsets": [0, 4]}}}}"#,
            m = u64::MAX / 2
        );
        let error = refusal(&header, 4, None);
        assert!(error.contains("tensor `a`") && error.contains("whole number of bytes"), "{error}");
    }

    #[test]
    fn offsets_beyond_the_end_of_the_file_are_refused_as_truncation() {
        let error = refusal(ONE, 10, None);
        assert!(error.contains("holds 10 bytes of data: truncated"), "{error}");
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let header = r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#;
        let error = refusal(header, 8, None);
        assert!(error.contains("overlapping or gapped"), "{error}");
    }

    #[test]
    fn bytes_no_tensor_accounts_for_are_refused() {
        let error = refusal(ONE, 30, None);
        assert!(error.contains("bytes no tensor accounts for"), "{error}");
    }

    #[test]
    fn an_unknown_dtype_is_refused_naming_the_tensor() {
        let header = r#"{"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}"#;
        let error = refusal(header, 1, None);
        assert!(error.contains("tensor `a` in the header"), "{error}");
    }

    #[test]
    fn a_pickle_that_is_not_a_zip_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        std::fs::write(&path, b"not a zip archive at all").unwrap();
        let error = WeightFiles::open(&[path]).unwrap_err().to_string();
        assert!(error.contains("not a readable PyTorch state dict"), "{error}");
    }
}
