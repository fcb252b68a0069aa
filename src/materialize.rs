//! Making stored outputs visible as ordinary files: in a stage's scratch (its inputs) and in the
//! run directory a person looks at. Files are hardlinks to the read-only objects (no bytes
//! copied); a copy is the fallback across filesystems, and for executables, whose mode an
//! object shared with non-executable content cannot carry.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sdpipe_stages::api::OutputKind;

use crate::cache::{make_writable_recursive, ObjectStore, OutputRecord};
use crate::hash::Tree;

/// Read a stored tree manifest.
pub fn load_tree(store: &dyn ObjectStore, output: &OutputRecord) -> io::Result<Tree> {
    let bytes = fs::read(store.path(&output.digest))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt tree manifest {}: {e}", output.digest),
        )
    })
}

/// Whether every object an output needs is present.
pub fn is_complete(store: &dyn ObjectStore, output: &OutputRecord) -> bool {
    match output.kind {
        OutputKind::File => store.contains(&output.digest),
        OutputKind::Dir => {
            store.contains(&output.digest)
                && load_tree(store, output)
                    .is_ok_and(|t| t.entries.iter().all(|e| store.contains(&e.digest)))
        }
    }
}

/// Create `dest` (which must not exist) as a view of the output.
pub fn place(store: &dyn ObjectStore, output: &OutputRecord, dest: &Path) -> io::Result<()> {
    match output.kind {
        OutputKind::File => {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            link_or_copy(&store.path(&output.digest), dest, false)
        }
        OutputKind::Dir => {
            fs::create_dir_all(dest)?;
            for entry in load_tree(store, output)?.entries {
                let target = dest.join(&entry.path);
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)?;
                }
                link_or_copy(&store.path(&entry.digest), &target, entry.exec)?;
            }
            Ok(())
        }
    }
}

fn link_or_copy(object: &Path, dest: &Path, exec: bool) -> io::Result<()> {
    if !exec && fs::hard_link(object, dest).is_ok() {
        return Ok(());
    }
    fs::copy(object, dest)?;
    let mode = if exec { 0o555 } else { 0o444 };
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))
}

/// Replace `dir` with a fresh directory holding each `(relative path, output)`, so a reader
/// never sees a mix of two runs' files for longer than two renames.
pub fn replace_dir(
    store: &dyn ObjectStore,
    dir: &Path,
    outputs: &[(String, &OutputRecord)],
) -> io::Result<()> {
    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    fs::create_dir_all(&parent)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging = parent.join(format!(".{name}.new-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    remove_abandoned(&parent, &name);
    remove_tree(&staging)?;
    fs::create_dir_all(&staging)?;
    for (rel, output) in outputs {
        place(store, output, &staging.join(rel))?;
    }
    if dir.exists() {
        remove_tree(&old)?;
        fs::rename(dir, &old)?;
    }
    fs::rename(&staging, dir)?;
    remove_tree(&old)
}

/// Remove the staging and retired copies (`.<name>.new-<pid>`, `.<name>.old-<pid>`) that a
/// process killed mid-swap left beside `<name>`. A live process's are left alone: it may be
/// swapping right now. (A dead process's pid reused by another process only delays cleanup.)
fn remove_abandoned(parent: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    let (new, old) = (format!(".{name}.new-"), format!(".{name}.old-"));
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let pid = file.strip_prefix(&new).or_else(|| file.strip_prefix(&old));
        if let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) {
            if pid != std::process::id() as i32 && !process_alive(pid) {
                let _ = remove_tree(&entry.path());
            }
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // Signal 0 checks existence only; EPERM means it exists but belongs to another user.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Delete a tree that may hold read-only files.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    make_writable_recursive(path)?;
    fs::remove_dir_all(path)
}
