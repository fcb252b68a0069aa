//! The content-addressed object store: every stored file lives once, read-only, at
//! `objects/<first 2 hex>/<remaining 62 hex>` of its blake3 digest.
//!
//! Objects are written to a temporary name and renamed into place, so a reader never sees a
//! partial object and two writers of the same content cannot conflict.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::hash::{self, Digest};

/// Where stage outputs' bytes live. A remote store (S3) implements the same trait later.
pub trait ObjectStore: Send + Sync {
    fn contains(&self, digest: &Digest) -> bool;
    /// A local path to read the object from.
    fn path(&self, digest: &Digest) -> PathBuf;
    /// Move `src` (whose content has digest `digest`) into the store.
    fn put_file(&self, src: &Path, digest: &Digest) -> io::Result<()>;
    /// Store bytes (a tree manifest, a key manifest), returning their digest.
    fn put_bytes(&self, bytes: &[u8]) -> io::Result<Digest>;
    fn remove(&self, digest: &Digest) -> io::Result<()>;
    /// Every object and its size.
    fn list(&self) -> io::Result<Vec<(Digest, u64)>>;
}

pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> io::Result<LocalStore> {
        fs::create_dir_all(&root)?;
        Ok(LocalStore { root })
    }

    fn tmp_path(&self) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!(".tmp-{}-{n}", std::process::id()))
    }

    /// Make `path` read-only, durable, and atomically visible as object `digest`.
    fn install(&self, path: &Path, digest: &Digest) -> io::Result<()> {
        let dest = self.path(digest);
        fs::create_dir_all(dest.parent().expect("objects have a parent"))?;
        set_readonly(path)?;
        fs::File::open(path)?.sync_all()?;
        fs::rename(path, &dest)
    }
}

impl LocalStore {
    /// Temporary files (`.tmp-<pid>-<n>`) of objects whose writer died before renaming them
    /// into place: never objects, only garbage. Call only while no run can be writing (under
    /// the exclusive maintenance lock). Removes them unless `dry_run`; returns count and bytes.
    pub fn remove_stray_temps(&self, dry_run: bool) -> io::Result<(usize, u64)> {
        let (mut count, mut bytes) = (0, 0);
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                count += 1;
                bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                if !dry_run {
                    fs::remove_file(entry.path())?;
                }
            }
        }
        Ok((count, bytes))
    }
}

pub fn set_readonly(path: &Path) -> io::Result<()> {
    let mut perms = fs::metadata(path)?.permissions();
    perms.set_readonly(true);
    fs::set_permissions(path, perms)
}

impl ObjectStore for LocalStore {
    fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join(&hex[..2]).join(&hex[2..])
    }

    fn put_file(&self, src: &Path, digest: &Digest) -> io::Result<()> {
        if self.contains(digest) {
            return fs::remove_file(src);
        }
        // Same filesystem: a rename. Elsewhere: copy to a temporary name first.
        let tmp = self.tmp_path();
        match fs::rename(src, &tmp) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                // A full disk fails the copy part-way: drop the partial temporary.
                fs::copy(src, &tmp).inspect_err(|_| drop(fs::remove_file(&tmp)))?;
                fs::remove_file(src)?;
            }
            Err(e) => return Err(e),
        }
        self.install(&tmp, digest)
    }

    fn put_bytes(&self, bytes: &[u8]) -> io::Result<Digest> {
        let digest = Digest::of_bytes(bytes);
        if !self.contains(&digest) {
            let tmp = self.tmp_path();
            fs::write(&tmp, bytes)
                .and_then(|()| self.install(&tmp, &digest))
                .inspect_err(|_| drop(fs::remove_file(&tmp)))?;
        }
        Ok(digest)
    }

    fn remove(&self, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn list(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for shard in fs::read_dir(&self.root)? {
            let shard = shard?;
            let prefix = shard.file_name().to_string_lossy().into_owned();
            if prefix.len() != 2 || !shard.file_type()?.is_dir() {
                continue;
            }
            for obj in fs::read_dir(shard.path())? {
                let obj = obj?;
                let name = format!("{prefix}{}", obj.file_name().to_string_lossy());
                if let Some(d) = Digest::from_hex(&name) {
                    out.push((d, obj.metadata()?.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Rehash an object and say whether its bytes still match its name.
pub fn verify_object(store: &dyn ObjectStore, digest: &Digest) -> io::Result<bool> {
    Ok(hash::hash_file(&store.path(digest))? == *digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_objects_are_named_by_content_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("objects")).unwrap();
        let d = store.put_bytes(b"abc").unwrap();
        assert_eq!(d, Digest::of_bytes(b"abc"));
        assert_eq!(fs::read(store.path(&d)).unwrap(), b"abc");
        assert!(fs::metadata(store.path(&d)).unwrap().permissions().readonly());
        assert!(verify_object(&store, &d).unwrap());
    }

    #[test]
    fn putting_existing_content_just_drops_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("objects")).unwrap();
        let d = store.put_bytes(b"same").unwrap();
        let src = dir.path().join("src");
        fs::write(&src, b"same").unwrap();
        store.put_file(&src, &d).unwrap();
        assert!(!src.exists());
        assert_eq!(store.list().unwrap().len(), 1);
    }
}
