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
/// Smaller ones are hashed on the calling thread (files are hashed in parallel instead), read
/// whole into a reused per-thread buffer: no allocation per file, and no mapping, whose
/// `munmap` in a multithreaded process costs a TLB shootdown across cores (measured slower than
/// reading for the 16–64 KiB files of the benchmark).
const MMAP_THRESHOLD: u64 = 1 << 20;

/// Hash one file's content.
pub fn hash_file(path: &Path) -> io::Result<Digest> {
    let file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    hash_open_file(file, len, path)
}

/// Hash a file whose size a `stat` has just told us, without asking again.
fn hash_file_sized(path: &Path, len: u64) -> io::Result<Digest> {
    hash_open_file(fs::File::open(path)?, len, path)
}

fn hash_open_file(mut file: fs::File, len: u64, path: &Path) -> io::Result<Digest> {
    use std::io::Read;
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        drop(file);
        hasher.update_mmap_rayon(path)?;
    } else {
        BUF.with_borrow_mut(|buf| -> io::Result<()> {
            // The buffer only grows (zeroed once, then reused), and the loop reads until the
            // end of the file rather than `len` bytes: a file that grew since its `stat` is
            // hashed as it is now, never as a truncated prefix. (`read_to_end` would ask the
            // kernel for the size and position again: two syscalls per file.)
            if buf.len() <= len as usize {
                buf.resize(len as usize + 1, 0);
            }
            let mut filled = 0;
            loop {
                if filled == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
                match file.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            hasher.update(&buf[..filled]);
            // Keep the buffer for the next file unless an odd one made it large.
            if buf.len() > 4 * MMAP_THRESHOLD as usize {
                *buf = Vec::new();
            }
            Ok(())
        })?;
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

/// What hashing keeps of a file's metadata: its [`FileStat`] and executable bit (a tenth of
/// an `fs::Metadata`, which matters when a walk holds ten thousand of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub stat: FileStat,
    pub exec: bool,
}

impl FileMeta {
    pub fn of(meta: &fs::Metadata) -> FileMeta {
        FileMeta { stat: FileStat::of(meta), exec: meta.mode() & 0o111 != 0 }
    }
}

/// Remembered digests: per file by [`FileStat`], kept per *scope* (one dependency's set of
/// files, see [`memo_scope`]) and consulted and filled a whole set at a time; and per directory
/// (or glob) by the digest of its whole stat listing (see [`hash_tree`]), so that an unchanged
/// tree of thousands of files costs one lookup instead of one per file.
///
/// Everything here is a hint: a lost, stale or torn entry costs a rehash, never a wrong digest,
/// because every lookup is by the full [`FileStat`] (or listing digest) it was stored under.
pub trait DigestMemo: Sync {
    /// The digests remembered in `scope` for files with these stats.
    fn get_many(&self, scope: &Digest, stats: &[FileStat]) -> Vec<Option<Digest>>;
    /// Remember `entries` as all that `scope` knows: they replace what it held, so a scope never
    /// accumulates the stats of files long since changed.
    fn put_many(&self, scope: &Digest, entries: &[(FileStat, Digest)]);
    /// The tree digest remembered for a [`listing_digest`], if any.
    fn get_tree(&self, _listing: &Digest) -> Option<Digest> {
        None
    }
    fn put_tree(&self, _listing: &Digest, _tree: &Digest) {}
}

/// A memo that remembers nothing: every file is read (used by `cache verify`).
pub struct NoMemo;
impl DigestMemo for NoMemo {
    fn get_many(&self, _: &Digest, stats: &[FileStat]) -> Vec<Option<Digest>> {
        vec![None; stats.len()]
    }
    fn put_many(&self, _: &Digest, _: &[(FileStat, Digest)]) {}
}

/// The memo scope of a dependency `pattern` under `base`: which set of remembered file stats
/// its hashing consults and replaces. Named by the base directory's device and inode rather
/// than its path, so a moved project keeps its memo, while two projects (or two model
/// directories) never share one; a scope mix-up could only cost a rehash anyway.
pub fn memo_scope(base: &Path, pattern: &str, glob: bool) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"sdpipe memo scope 1\n");
    match fs::metadata(base) {
        Ok(meta) => {
            hasher.update(&meta.dev().to_le_bytes());
            hasher.update(&meta.ino().to_le_bytes());
        }
        Err(_) => {
            hasher.update(base.as_os_str().as_encoded_bytes());
        }
    }
    hasher.update(&[glob as u8]);
    hasher.update(pattern.as_bytes());
    Digest(*hasher.finalize().as_bytes())
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

/// Hash many files in parallel, reading every one (no memo). The tree's entries are in path
/// order; `files` in [`walk_files`] order are in the same order.
pub fn hash_entries(files: &[FileEntry]) -> io::Result<Tree> {
    let metas = stat_all(files)?;
    hash_stated(files, &metas, &Digest([0; 32]), &NoMemo)
}

fn stat_all(files: &[FileEntry]) -> io::Result<Vec<FileMeta>> {
    files
        .par_iter()
        .map(|f| fs::metadata(&f.abs).map(|m| FileMeta::of(&m)).map_err(|e| annotate(e, &f.abs)))
        .collect()
}

/// Hash files whose metadata is already known (`metas[i]` is `files[i]`'s), consulting
/// `memo`'s `scope` and, if anything had to be read, replacing it with every digest now known.
fn hash_stated(
    files: &[FileEntry],
    metas: &[FileMeta],
    scope: &Digest,
    memo: &dyn DigestMemo,
) -> io::Result<Tree> {
    let stats: Vec<FileStat> = metas.iter().map(|m| m.stat).collect();
    let known = memo.get_many(scope, &stats);
    let now = now_ns();
    let digests: Vec<(Digest, bool)> = files
        .par_iter()
        .zip(metas.par_iter())
        .zip(known.par_iter())
        .map(|((f, m), known)| match known {
            Some(d) => Ok((*d, false)),
            None => hash_file_sized(&f.abs, m.stat.size)
                .map(|d| (d, true))
                .map_err(|e| annotate(e, &f.abs)),
        })
        .collect::<io::Result<_>>()?;
    if digests.iter().any(|(_, new)| *new) {
        // Remembered and fresh digests alike: the scope is replaced, not extended.
        let entries: Vec<(FileStat, Digest)> = stats
            .iter()
            .zip(&digests)
            .filter(|(s, _)| !s.is_racy(now))
            .map(|(s, (d, _))| (*s, *d))
            .collect();
        if !entries.is_empty() {
            memo.put_many(scope, &entries);
        }
    }
    let mut entries: Vec<TreeEntry> = files
        .iter()
        .zip(metas)
        .zip(&digests)
        .map(|((f, m), (d, _))| TreeEntry {
            path: f.rel.clone(),
            digest: *d,
            size: m.stat.size,
            exec: m.exec,
        })
        .collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Tree { entries })
}

/// One digest of everything that identifies a set of files without reading them: each file's
/// relative path, [`FileStat`] and executable bit, in path order. If it is unchanged, so is
/// every file's content (the trust the per-file memo places in a [`FileStat`]) and hence the
/// tree; any added, removed, renamed, replaced, resized or touched file changes it.
pub fn listing_digest(files: &[FileEntry], metas: &[FileMeta]) -> Digest {
    let mut order: Vec<usize> = (0..files.len()).collect();
    if !files.is_sorted_by(|a, b| a.rel <= b.rel) {
        order.sort_by(|&a, &b| files[a].rel.cmp(&files[b].rel));
    }
    // One contiguous buffer, hashed at once: blake3 then hashes many chunks in parallel SIMD
    // lanes, where four small `update`s per file would feed it one short piece at a time.
    let mut bytes = Vec::with_capacity(32 + files.iter().map(|f| f.rel.len() + 65).sum::<usize>());
    bytes.extend_from_slice(b"sdpipe stat listing 1\n");
    for i in order {
        let rel = files[i].rel.as_bytes();
        bytes.extend_from_slice(&(rel.len() as u64).to_le_bytes());
        bytes.extend_from_slice(rel);
        bytes.extend_from_slice(&metas[i].stat.key());
        bytes.push(metas[i].exec as u8);
    }
    Digest::of_bytes(&bytes)
}

/// The digest of the tree `files` form (the same as `hash_entries(&files)?.digest()`) and their
/// relative paths in tree order; `metas[i]` is `files[i]`'s metadata. An unchanged listing is
/// answered by the memo with one lookup; otherwise the files are hashed (each consulting the
/// per-file memo of `scope`) and, unless one of them is too recently modified to trust its
/// timestamp, the listing is remembered.
pub fn hash_tree(
    files: Vec<FileEntry>,
    metas: &[FileMeta],
    scope: &Digest,
    memo: &dyn DigestMemo,
) -> io::Result<(Digest, Vec<String>)> {
    let listing = listing_digest(&files, metas);
    if let Some(digest) = memo.get_tree(&listing) {
        let mut paths: Vec<String> = files.into_iter().map(|f| f.rel).collect();
        if !paths.is_sorted() {
            paths.sort_unstable();
        }
        return Ok((digest, paths));
    }
    let tree = hash_stated(&files, metas, scope, memo)?;
    let digest = tree.digest();
    let now = now_ns();
    if !metas.iter().any(|m| m.stat.is_racy(now)) {
        memo.put_tree(&listing, &digest);
    }
    Ok((digest, tree.entries.into_iter().map(|e| e.path).collect()))
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

/// Every regular file under `dir`, with paths relative to it (`/`-separated), sorted by that
/// path (the order of a [`Tree`]'s entries). Symlinks are refused: a link would make the
/// tree's meaning depend on what lies outside it.
pub fn walk_files(dir: &Path) -> io::Result<Vec<FileEntry>> {
    Ok(walk_stat(dir)?.0)
}

/// [`walk_files`] and each file's metadata. Directories are read in parallel and each file is
/// stated relative to its open directory (`DirEntry::metadata` is an `fstatat` on the
/// directory's descriptor), so the kernel resolves one name per file instead of its whole
/// absolute path: for a no-op run over thousands of files this walk is most of the work.
pub fn walk_stat(dir: &Path) -> io::Result<(Vec<FileEntry>, Vec<FileMeta>)> {
    if fs::symlink_metadata(dir).map_err(|e| annotate(e, dir))?.is_symlink() {
        return Err(symlink_refused(dir));
    }
    let found = walk_dir(dir, "")?;
    debug_assert!(found.is_sorted_by(|a, b| a.0.rel <= b.0.rel));
    Ok(found.into_iter().unzip())
}

fn walk_dir(dir: &Path, prefix: &str) -> io::Result<Vec<(FileEntry, FileMeta)>> {
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| annotate(e, dir))? {
        let entry = entry.map_err(|e| annotate(e, dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| annotate(e, &path))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let mut rel = String::with_capacity(prefix.len() + 1 + name.len());
        if !prefix.is_empty() {
            rel.push_str(prefix);
            rel.push('/');
        }
        rel.push_str(&name);
        if file_type.is_symlink() {
            return Err(symlink_refused(&path));
        } else if file_type.is_dir() {
            subdirs.push((path, rel));
        } else if file_type.is_file() {
            files.push((entry, path, rel));
        }
    }
    files.sort_unstable_by(|a, b| a.2.cmp(&b.2));
    subdirs.sort_unstable_by(|a, b| a.1.cmp(&b.1));
    // Stated before descending, so this directory's descriptor (held by its entries) is closed
    // before its subdirectories are opened.
    let stated: Vec<(FileEntry, FileMeta)> = files
        .into_par_iter()
        .with_min_len(64)
        .map(|(entry, abs, rel)| {
            let meta = entry.metadata().map_err(|e| annotate(e, &abs))?;
            Ok((FileEntry { rel, abs }, FileMeta::of(&meta)))
        })
        .collect::<io::Result<_>>()?;
    let nested: Vec<(String, Vec<(FileEntry, FileMeta)>)> = subdirs
        .into_par_iter()
        .map(|(path, rel)| walk_dir(&path, &rel).map(|found| (rel, found)))
        .collect::<io::Result<_>>()?;
    // Merge into tree order: a subdirectory's files sort as if its name ended in '/'.
    let mut found =
        Vec::with_capacity(stated.len() + nested.iter().map(|n| n.1.len()).sum::<usize>());
    let mut nested = nested.into_iter().peekable();
    for file in stated {
        while let Some((sub, _)) = nested.peek() {
            let sub_first = sub.bytes().chain([b'/']).lt(file.0.rel.bytes());
            if !sub_first {
                break;
            }
            found.extend(nested.next().expect("peeked").1);
        }
        found.push(file);
    }
    found.extend(nested.flat_map(|n| n.1));
    Ok(found)
}

fn symlink_refused(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is a symbolic link; sdpipe stores only regular files", path.display()),
    )
}

fn rel_path(base: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(base).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Whether a dependency path is a pattern (`*`, `?`, `[…]`, `{…}`) rather than one path.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{'])
}

/// The files matching a glob, relative to `base`, sorted. The walk starts at the pattern's
/// literal prefix so `data/raw/*.csv` never walks the whole project.
pub fn expand_glob(base: &Path, pattern: &str) -> io::Result<Vec<FileEntry>> {
    let glob = globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?
        .compile_matcher();
    let literal: Vec<&str> = pattern.split('/').take_while(|c| !is_glob(c)).collect();
    let root = base.join(literal.join("/"));
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&root).follow_links(true) {
        let entry = entry.map_err(io::Error::other)?;
        if entry.file_type().is_file() {
            let rel = rel_path(base, entry.path());
            if glob.is_match(&rel) {
                out.push(FileEntry { rel, abs: entry.path().to_path_buf() });
            }
        }
    }
    out.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// What a dependency resolves to at hashing time.
pub enum Hashed {
    File(Digest),
    /// A directory or glob: its tree digest and its files' relative paths, sorted.
    Tree {
        digest: Digest,
        files: Vec<String>,
    },
}

impl Hashed {
    pub fn digest(&self) -> Digest {
        match self {
            Hashed::File(d) | Hashed::Tree { digest: d, .. } => *d,
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
    let scope = memo_scope(base, pattern, glob);
    let tree = |files: Vec<FileEntry>, metas: Vec<FileMeta>| {
        hash_tree(files, &metas, &scope, memo).map(|(digest, files)| Hashed::Tree { digest, files })
    };
    if glob {
        let files = expand_glob(base, pattern)?;
        if files.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("`{pattern}` matches no files"),
            ));
        }
        let metas = stat_all(&files)?;
        return tree(files, metas);
    }
    let abs = base.join(pattern);
    let meta = fs::metadata(&abs).map_err(|e| annotate(e, &abs))?;
    if meta.is_dir() {
        let (files, metas) = walk_stat(&abs)?;
        tree(files, metas)
    } else {
        let file = FileEntry { rel: String::new(), abs };
        let tree = hash_stated(std::slice::from_ref(&file), &[FileMeta::of(&meta)], &scope, memo)?;
        Ok(Hashed::File(tree.entries[0].digest))
    }
}

/// Hash content a stage kind resolved outside the project (`StageKind::external_deps`): a
/// file or a directory at `path`, which is absolute.
///
/// Unlike a project dependency, symbolic links are followed, in `path` itself and inside a
/// directory: the Hugging Face cache lays out every snapshot file as a relative link into
/// `blobs/`, and what the result depends on is the bytes the link leads to, never where the link
/// sits (so two revisions sharing a blob, or the same model found in another cache, give one
/// digest). A dangling link is an error naming the link.
pub fn hash_external(path: &Path, memo: &dyn DigestMemo) -> io::Result<Hashed> {
    let scope = memo_scope(path, "", false);
    let meta = fs::metadata(path).map_err(|e| annotate(e, path))?;
    if !meta.is_dir() {
        let file = FileEntry { rel: String::new(), abs: path.to_path_buf() };
        let tree = hash_stated(std::slice::from_ref(&file), &[FileMeta::of(&meta)], &scope, memo)?;
        return Ok(Hashed::File(tree.entries[0].digest));
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(path).follow_links(true) {
        // walkdir's error names the path (and the link loop, if any).
        let entry = entry.map_err(io::Error::other)?;
        if entry.file_type().is_file() {
            files.push(FileEntry { rel: rel_path(path, entry.path()), abs: entry.into_path() });
        }
    }
    files.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
    let metas = stat_all(&files)?;
    let (digest, files) = hash_tree(files, &metas, &scope, memo)?;
    Ok(Hashed::Tree { digest, files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct CountingMemo {
        map: Mutex<std::collections::HashMap<FileStat, Digest>>,
        trees: Mutex<std::collections::HashMap<Digest, Digest>>,
    }
    impl DigestMemo for CountingMemo {
        fn get_many(&self, _: &Digest, stats: &[FileStat]) -> Vec<Option<Digest>> {
            let m = self.map.lock().unwrap();
            stats.iter().map(|s| m.get(s).copied()).collect()
        }
        fn put_many(&self, _: &Digest, entries: &[(FileStat, Digest)]) {
            self.map.lock().unwrap().extend(entries.iter().copied());
        }
        fn get_tree(&self, listing: &Digest) -> Option<Digest> {
            self.trees.lock().unwrap().get(listing).copied()
        }
        fn put_tree(&self, listing: &Digest, tree: &Digest) {
            self.trees.lock().unwrap().insert(*listing, *tree);
        }
    }

    fn set_old_mtime(path: &Path) {
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options().write(true).open(path).unwrap().set_modified(old).unwrap();
    }

    /// A directory of `n` files, all old enough to be memoised.
    fn old_tree(n: usize) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for i in 0..n {
            let p = d.path().join(format!("sub{}/f{i}", i % 3));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, format!("content {i}")).unwrap();
            set_old_mtime(&p);
        }
        d
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

    #[test]
    fn tree_digest_is_the_digest_of_the_hashed_tree() {
        let d = old_tree(7);
        let (files, metas) = walk_stat(d.path()).unwrap();
        let tree = hash_entries(&files).unwrap();
        let (digest, paths) = hash_tree(files, &metas, &Digest([0; 32]), &NoMemo).unwrap();
        assert_eq!(digest, tree.digest());
        assert_eq!(paths, tree.entries.iter().map(|e| e.path.clone()).collect::<Vec<_>>());
    }

    #[test]
    fn an_unchanged_listing_is_answered_by_the_tree_memo_without_reading_files() {
        let d = old_tree(5);
        let memo = CountingMemo::default();
        let first = hash_path(d.path(), ".", false, &memo).unwrap().digest();
        assert_eq!(memo.trees.lock().unwrap().len(), 1);
        // Prove the second answer comes from the memo: plant a different digest there.
        let planted = Digest([9; 32]);
        for v in memo.trees.lock().unwrap().values_mut() {
            *v = planted;
        }
        assert_ne!(first, planted);
        assert_eq!(hash_path(d.path(), ".", false, &memo).unwrap().digest(), planted);
    }

    #[test]
    fn any_stat_change_in_a_tree_misses_the_tree_memo() {
        let d = old_tree(4);
        let memo = CountingMemo::default();
        let files = walk_files(d.path()).unwrap();
        let listing = |files: &[FileEntry]| {
            let metas: Vec<_> =
                files.iter().map(|f| FileMeta::of(&fs::metadata(&f.abs).unwrap())).collect();
            listing_digest(files, &metas)
        };
        let before = listing(&files);
        hash_path(d.path(), ".", false, &memo).unwrap();
        let target = &files[2].abs;
        // Touched (mtime only, same bytes): a different listing, yet the same tree digest.
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(30);
        fs::File::options().write(true).open(target).unwrap().set_modified(t).unwrap();
        assert_ne!(listing(&files), before);
        // Rewritten with new bytes of the same size: the listing and the tree both change.
        let old = hash_path(d.path(), ".", false, &memo).unwrap().digest();
        let len = fs::metadata(target).unwrap().len() as usize;
        fs::write(target, vec![b'x'; len]).unwrap();
        set_old_mtime(target);
        let new = hash_path(d.path(), ".", false, &memo).unwrap().digest();
        assert_ne!(old, new);
        // Renamed: same stats, different path.
        let renamed = walk_files(d.path()).unwrap();
        let before_rename = listing(&renamed);
        fs::rename(target, target.with_file_name("renamed")).unwrap();
        assert_ne!(listing(&walk_files(d.path()).unwrap()), before_rename);
        // Every listing the memo saw maps to the digest a full hash gives.
        let fresh = hash_entries(&walk_files(d.path()).unwrap()).unwrap().digest();
        assert_eq!(hash_path(d.path(), ".", false, &memo).unwrap().digest(), fresh);
    }

    #[test]
    fn a_tree_with_a_just_modified_file_is_not_remembered() {
        let d = old_tree(3);
        fs::write(d.path().join("new"), b"fresh").unwrap();
        let memo = CountingMemo::default();
        hash_path(d.path(), ".", false, &memo).unwrap();
        assert!(memo.trees.lock().unwrap().is_empty());
        // The old files are still memoised one by one.
        assert_eq!(memo.map.lock().unwrap().len(), 3);
    }

    #[test]
    fn walked_files_are_in_tree_order_with_their_own_metadata() {
        // `x/1` and `x.b`: per-directory name order would visit `x/1` first, but a tree's
        // entries (and hence every zip of files with entries) sort `x.b` first ('.' < '/').
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("x/y")).unwrap();
        for (name, len) in [("x/1", 1), ("x.b", 2), ("x/y/z", 3), ("a", 4), ("x0", 5)] {
            fs::write(d.path().join(name), vec![b'.'; len]).unwrap();
        }
        let (files, metas) = walk_stat(d.path()).unwrap();
        let rels: Vec<&str> = files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, ["a", "x.b", "x/1", "x/y/z", "x0"]);
        let sizes: Vec<u64> = metas.iter().map(|m| m.stat.size).collect();
        assert_eq!(sizes, [4, 2, 1, 3, 5]);
        let tree = hash_entries(&files).unwrap();
        let paths: Vec<&str> = tree.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, rels);
    }

    #[test]
    fn a_symlink_inside_a_tree_is_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("sub")).unwrap();
        fs::write(d.path().join("target"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("target"), d.path().join("sub/link")).unwrap();
        let err = walk_files(d.path()).unwrap_err();
        assert!(err.to_string().contains("sub/link is a symbolic link"), "{err}");
        // The tree's root too.
        std::os::unix::fs::symlink(d.path().join("sub"), d.path().join("rootlink")).unwrap();
        let err = walk_files(&d.path().join("rootlink")).unwrap_err();
        assert!(err.to_string().contains("rootlink is a symbolic link"), "{err}");
    }

    #[test]
    fn files_read_in_a_loop_hash_like_a_whole_read() {
        let d = tempfile::tempdir().unwrap();
        // Empty, odd-sized, and growing past the reused buffer's size from one file to the next.
        for len in [0usize, 1, 4097, 70_000, 3, 900_000] {
            let p = d.path().join(format!("f{len}"));
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            fs::write(&p, &data).unwrap();
            assert_eq!(hash_file(&p).unwrap(), Digest::of_bytes(&data), "{len} bytes");
            // A stale, smaller size (the file grew after its stat) still hashes all of it.
            assert_eq!(hash_file_sized(&p, len as u64 / 2).unwrap(), Digest::of_bytes(&data));
        }
    }

    #[test]
    fn the_memo_scope_follows_the_base_directory_not_its_path() {
        let parent = tempfile::tempdir().unwrap();
        let (a, b) = (parent.path().join("a"), parent.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let before = memo_scope(&a, "data", false);
        assert_ne!(before, memo_scope(&b, "data", false));
        assert_ne!(before, memo_scope(&a, "data", true));
        assert_ne!(before, memo_scope(&a, "other", false));
        let moved = parent.path().join("moved");
        fs::rename(&a, &moved).unwrap();
        assert_eq!(memo_scope(&moved, "data", false), before);
    }
}
