//! PyTorch's zip checkpoint (torch ≥ 1.6): `<archive>/data.pkl` is the object pickle, each
//! storage is the raw little-endian file `<archive>/data/<key>`, `<archive>/byteorder` (when
//! present) says the byte order.
//!
//! candle's `pickle` module reads this container too, but only tensors that are contiguous (or
//! Fortran-contiguous) in their storage; state dicts can hold views (`w[1:3]`, slices of a
//! shared storage), so the shared [`super::pickle`] machine reads both containers alike.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::Tensor;

use super::pickle::{materialise, state_dict, unpickle, PickleError, Reader};

fn zip_err(e: impl std::fmt::Display) -> PickleError {
    PickleError(format!("zip archive: {e}"))
}

fn read_entry<R: std::io::Read + std::io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    name: &str,
) -> Result<Vec<u8>, PickleError> {
    let mut entry = archive.by_name(name).map_err(|e| zip_err(format!("{name}: {e}")))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut bytes).map_err(|e| zip_err(format!("{name}: {e}")))?;
    Ok(bytes)
}

/// Decode a zip checkpoint into named tensors, sorted by name.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, PickleError> {
    let file = std::fs::File::open(path).map_err(zip_err)?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zip_err)?;
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(zip_err)?;
    let pickle_name = names
        .into_iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| zip_err("no data.pkl: not a torch.save archive"))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
    if let Ok(order) = read_entry(&mut archive, &format!("{prefix}byteorder")) {
        if order.trim_ascii() != b"little" {
            return Err(PickleError("big-endian checkpoints are not supported".into()));
        }
    }
    let pickle = read_entry(&mut archive, &pickle_name)?;
    let tensors = state_dict(unpickle(&mut Reader { bytes: &pickle, pos: 0 })?)?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let key = &t.storage.key;
        if !storages.contains_key(key) {
            let bytes = read_entry(&mut archive, &format!("{prefix}data/{key}"))?;
            storages.insert(key.clone(), bytes);
        }
        out.push((name.clone(), materialise(&name, &t, &storages[key])?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
