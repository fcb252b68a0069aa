//! Reading back a folder a stage wrote, for comparing outputs.

use std::collections::BTreeMap;
use std::path::Path;

/// Every file under `root`, by its path relative to it, with its bytes.
pub fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let name = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let bytes = std::fs::read(&path).unwrap();
                files.insert(name, bytes);
            }
        }
    }
    files
}
