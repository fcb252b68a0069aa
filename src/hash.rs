//! Content digests: blake3 over files (parallel, memory-mapped for big ones), canonical tree
//! manifests for directories and globs, and a stat memo so unchanged files are not rehashed.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A blake3 digest, shown and serialised as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Digest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Digest(out))
    }
    /// The first 12 hex characters, for people.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom("invalid digest"))
    }
}

/// Files at least this big are memory-mapped and hashed with blake3's multithreaded tree mode.
const MMAP_THRESHOLD: u64 = 1 << 20;

/// Hash one file's content.
pub fn hash_file(path: &Path) -> io::Result<Digest> {
    let meta = fs::metadata(path)?;
    let mut hasher = blake3::Hasher::new();
    if meta.len() >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path)?;
    } else {
        hasher.update(&fs::read(path)?);
    }
    Ok(Digest(*hasher.finalize().as_bytes()))
}

/// What identifies a file's content without reading it: if none of these changed, neither did
/// the bytes (the same trust git's index and cargo's fingerprints place in them). ctime is
/// included so that an edit which restores the mtime is still noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStat {
    pub fn of(meta: &fs::Metadata) -> FileStat {
        FileStat {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }

    /// A fixed-width key for the memo table.
    pub fn key(&self) -> [u8; 56] {
        let mut k = [0u8; 56];
        k[0..8].copy_from_slice(&self.dev.to_be_bytes());
        k[8..16].copy_from_slice(&self.ino.to_be_bytes());
        k[16..24].copy_from_slice(&self.size.to_be_bytes());
        k[24..40].copy_from_slice(&self.mtime_ns.to_be_bytes());
        k[40..56].copy_from_slice(&self.ctime_ns.to_be_bytes());
        k
    }

    /// A file modified within this window of "now" may still be written to within the same
    /// timestamp granule, so its digest is not memoised (git's "racy clean" problem).
    pub fn is_racy(&self, now_ns: i128) -> bool {
        now_ns - self.mtime_ns < 2_000_000_000
    }
}

/// Remembered digests by [`FileStat`], consulted and filled in batches.
pub trait DigestMemo: Sync {
    fn get_many(&self, stats: &[FileStat]) -> Vec<Option<Digest>>;
    fn put_many(&self, entries: &[(FileStat, Digest)]);
}

/// A memo that remembers nothing: every file is read (used by `cache verify`).
pub struct NoMemo;
impl DigestMemo for NoMemo {
    fn get_many(&self, stats: &[FileStat]) -> Vec<Option<Digest>> {
        vec![None; stats.len()]
    }
    fn put_many(&self, _: &[(FileStat, Digest)]) {}
}

/// A file to hash, with the relative path it has inside its tree.
#[derive(Debug, Clone)]
pub struct FileEntry {
    pub rel: String,
    pub abs: PathBuf,
}

/// One entry of a tree manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub path: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exec: bool,
}

/// A directory's content: entries sorted by path. Its digest is blake3 of its canonical JSON,
/// which is also the bytes it is stored as, so a tree is an object like any file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Tree {
    pub entries: Vec<TreeEntry>,
}

impl Tree {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("tree manifests always serialise")
    }
    pub fn digest(&self) -> Digest {
        Digest::of_bytes(&self.to_bytes())
    }
    pub fn total_size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// Hash many files in parallel, consulting and filling `memo`.
pub fn hash_entries(files: &[FileEntry], memo: &dyn DigestMemo) -> io::Result<Tree> {
    let metas: Vec<fs::Metadata> = files
        .par_iter()
        .map(|f| fs::metadata(&f.abs).map_err(|e| annotate(e, &f.abs)))
        .collect::<io::Result<_>>()?;
    let stats: Vec<FileStat> = metas.iter().map(FileStat::of).collect();
    let known = memo.get_many(&stats);
    let now = now_ns();
    let digests: Vec<(Digest, bool)> = files
        .par_iter()
        .zip(known.par_iter())
        .map(|(f, known)| match known {
            Some(d) => Ok((*d, false)),
            None => hash_file(&f.abs).map(|d| (d, true)).map_err(|e| annotate(e, &f.abs)),
        })
        .collect::<io::Result<_>>()?;
    let fresh: Vec<(FileStat, Digest)> = stats
        .iter()
        .zip(&digests)
        .filter(|(s, (_, new))| *new && !s.is_racy(now))
        .map(|(s, (d, _))| (*s, *d))
        .collect();
    if !fresh.is_empty() {
        memo.put_many(&fresh);
    }
    let mut entries: Vec<TreeEntry> = files
        .iter()
        .zip(&metas)
        .zip(&digests)
        .map(|((f, m), (d, _))| TreeEntry {
            path: f.rel.clone(),
            digest: *d,
            size: m.len(),
            exec: m.mode() & 0o111 != 0,
        })
        .collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Tree { entries })
}

fn annotate(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Every regular file under `dir`, with paths relative to it (`/`-separated), sorted.
/// Symlinks are refused: a link would make the tree's meaning depend on what lies outside it.
pub fn walk_files(dir: &Path) -> io::Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(io::Error::other)?;
        let ft = entry.file_type();
        if ft.is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is a symbolic link; sdpipe stores only regular files",
                    entry.path().display()
                ),
            ));
        }
        if ft.is_file() {
            out.push(FileEntry {
                rel: rel_path(dir, entry.path()),
                abs: entry.path().to_path_buf(),
            });
        }
    }
    Ok(out)
}

fn rel_path(base: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(base).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// The files matching a glob, relative to `base`, sorted. The walk starts at the pattern's
/// literal prefix so `data/raw/*.csv` never walks the whole project.
pub fn expand_glob(base: &Path, pattern: &str) -> io::Result<Vec<FileEntry>> {
    let glob = globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
        .compile_matcher();
    let literal: Vec<&str> = pattern.split('/').take_while(|c| !crate::spec::is_glob(c)).collect();
    let root = base.join(literal.join("/"));
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&root).follow_links(true).sort_by_file_name() {
        let entry = entry.map_err(io::Error::other)?;
        if entry.file_type().is_file() {
            let rel = rel_path(base, entry.path());
            if glob.is_match(&rel) {
                out.push(FileEntry { rel, abs: entry.path().to_path_buf() });
            }
        }
    }
    Ok(out)
}

/// What a dependency resolves to at hashing time.
pub enum Hashed {
    File(Digest),
    Tree(Tree),
}

impl Hashed {
    pub fn digest(&self) -> Digest {
        match self {
            Hashed::File(d) => *d,
            Hashed::Tree(t) => t.digest(),
        }
    }
}

/// Hash a path that is a file, a directory, or (with `glob`) a pattern under `base`.
pub fn hash_path(
    base: &Path,
    pattern: &str,
    glob: bool,
    memo: &dyn DigestMemo,
) -> io::Result<Hashed> {
    if glob {
        let files = expand_glob(base, pattern)?;
        if files.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("`{pattern}` matches no files"),
            ));
        }
        return hash_entries(&files, memo).map(Hashed::Tree);
    }
    let abs = base.join(pattern);
    let meta = fs::metadata(&abs).map_err(|e| annotate(e, &abs))?;
    if meta.is_dir() {
        hash_entries(&walk_files(&abs)?, memo).map(Hashed::Tree)
    } else {
        let file = FileEntry { rel: String::new(), abs };
        let tree = hash_entries(std::slice::from_ref(&file), memo)?;
        Ok(Hashed::File(tree.entries[0].digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct CountingMemo {
        map: Mutex<std::collections::HashMap<FileStat, Digest>>,
    }
    impl DigestMemo for CountingMemo {
        fn get_many(&self, stats: &[FileStat]) -> Vec<Option<Digest>> {
            let m = self.map.lock().unwrap();
            stats.iter().map(|s| m.get(s).copied()).collect()
        }
        fn put_many(&self, entries: &[(FileStat, Digest)]) {
            self.map.lock().unwrap().extend(entries.iter().copied());
        }
    }

    #[test]
    fn file_digest_is_blake3_of_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        fs::write(&p, b"hello").unwrap();
        assert_eq!(hash_file(&p).unwrap().0, *blake3::hash(b"hello").as_bytes());
    }

    #[test]
    fn large_files_hash_the_same_through_mmap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        fs::write(&p, &data).unwrap();
        assert_eq!(hash_file(&p).unwrap(), Digest::of_bytes(&data));
    }

    #[test]
    fn tree_digest_ignores_location_but_not_names() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            fs::create_dir_all(d.join("x")).unwrap();
            fs::write(d.join("x/1.txt"), b"one").unwrap();
            fs::write(d.join("2.txt"), b"two").unwrap();
        }
        let ha = hash_path(a.path(), ".", false, &NoMemo).unwrap().digest();
        assert_eq!(ha, hash_path(b.path(), ".", false, &NoMemo).unwrap().digest());
        fs::rename(b.path().join("2.txt"), b.path().join("3.txt")).unwrap();
        assert_ne!(ha, hash_path(b.path(), ".", false, &NoMemo).unwrap().digest());
    }

    #[test]
    fn glob_matches_within_its_literal_prefix() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("data/sub")).unwrap();
        fs::write(d.path().join("data/a.csv"), b"1").unwrap();
        fs::write(d.path().join("data/sub/b.csv"), b"2").unwrap();
        fs::write(d.path().join("data/c.txt"), b"3").unwrap();
        let names = |p: &str| -> Vec<String> {
            expand_glob(d.path(), p).unwrap().into_iter().map(|f| f.rel).collect()
        };
        assert_eq!(names("data/*.csv"), vec!["data/a.csv"]);
        assert_eq!(names("data/**/*.csv"), vec!["data/a.csv", "data/sub/b.csv"]);
        assert!(names("nothing/*.csv").is_empty());
    }

    #[test]
    fn memo_is_consulted_and_racy_files_are_not_memoised() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"x").unwrap();
        let memo = CountingMemo::default();
        hash_path(d.path(), "f", false, &memo).unwrap();
        // Just written: too recent to trust its timestamp.
        assert!(memo.map.lock().unwrap().is_empty());
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options().write(true).open(&p).unwrap().set_modified(old).unwrap();
        hash_path(d.path(), "f", false, &memo).unwrap();
        assert_eq!(memo.map.lock().unwrap().len(), 1);
        // A memoised digest is served without reading the file.
        let stat = FileStat::of(&fs::metadata(&p).unwrap());
        memo.map.lock().unwrap().insert(stat, Digest([7; 32]));
        assert_eq!(hash_path(d.path(), "f", false, &memo).unwrap().digest(), Digest([7; 32]));
    }
}
