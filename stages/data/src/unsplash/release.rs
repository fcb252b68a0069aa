//! Reading the `photos` shards of a release, from its zip or from a folder of extracted TSVs.
//!
//! Entry names in a zip are data, never paths: nothing is extracted. A shard is recognised by
//! the last component of its name (`photos.tsv000`, or `photos.csv000` in older releases) and
//! its bytes are read into memory. Entries that are directories, symlinks, absolute, or contain
//! a `..` component are ignored and reported, whatever they are called.

use std::fs;
use std::io::{Read, Seek};
use std::path::Path;

use super::tsv::{self, Photo, TsvError};

/// The largest shard read into memory; the Lite `photos` table is about 30 MB in all.
const MAX_SHARD_BYTES: u64 = 1 << 30;

/// The raw bytes of one `photos` shard and the name it had in its zip or folder.
#[derive(Debug)]
pub struct RawShard {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// An entry of the zip that was not read, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Ignored {
    pub name: String,
    pub reason: &'static str,
}

/// Every photo of a release, with what was noticed while reading it.
#[derive(Debug, Default)]
pub struct Release {
    /// In shard-number order, then row order; each id once (the first row wins).
    pub photos: Vec<Photo>,
    /// Human-readable notes for the stage log: shards read, entries ignored, rows dropped.
    pub notes: Vec<String>,
    pub ignored: Vec<Ignored>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a readable zip archive ({message}); delete it if it is a partial download"
    )]
    Zip { path: String, message: String },
    #[error("{0}")]
    Tsv(#[from] TsvError),
    #[error(
        "{place} holds no `photos` shard (expected `photos.tsv000`, ... or `photos.csv000`, ...)"
    )]
    NoShards { place: String },
    #[error("{name} in {place} is larger than {MAX_SHARD_BYTES} bytes; refusing to read it")]
    TooLarge { name: String, place: String },
}

/// Whether a file name is a `photos` shard: `photos.tsv` or `photos.csv` and digits.
pub fn is_photos_shard(file_name: &str) -> bool {
    ["photos.tsv", "photos.csv"].iter().any(|prefix| {
        file_name.strip_prefix(prefix).is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The number a shard name ends in (`photos.tsv012` → 12); none sorts first.
fn shard_number(name: &str) -> Option<u64> {
    let digits = name.len() - name.bytes().rev().take_while(u8::is_ascii_digit).count();
    name[digits..].parse().ok()
}

/// The `photos` shards of a zip archive.
pub fn shards_from_zip(path: &Path) -> Result<(Vec<RawShard>, Vec<Ignored>), ReleaseError> {
    let file = fs::File::open(path).map_err(|e| io_error(path, e))?;
    shards_from_zip_reader(file, &path.display().to_string())
}

fn shards_from_zip_reader<R: Read + Seek>(
    reader: R,
    place: &str,
) -> Result<(Vec<RawShard>, Vec<Ignored>), ReleaseError> {
    let zip_error =
        |e: zip::result::ZipError| ReleaseError::Zip { path: place.into(), message: e.to_string() };
    let mut archive = zip::ZipArchive::new(reader).map_err(zip_error)?;
    let mut shards = Vec::new();
    let mut ignored = Vec::new();
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(zip_error)?;
        let name = String::from_utf8_lossy(entry.name_raw()).into_owned();
        let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
        if !is_photos_shard(base) {
            continue;
        }
        let reason = if entry.is_symlink() {
            Some("symlink entry")
        } else if entry.is_dir() {
            Some("directory entry")
        } else if unsafe_entry_name(&name) || entry.enclosed_name().is_none() {
            Some("absolute or `..` path")
        } else {
            None
        };
        if let Some(reason) = reason {
            ignored.push(Ignored { name, reason });
            continue;
        }
        let mut bytes = Vec::with_capacity(entry.size().min(MAX_SHARD_BYTES) as usize);
        // `take` bounds what a lying size field or a zip bomb can make us hold.
        (&mut entry).take(MAX_SHARD_BYTES + 1).read_to_end(&mut bytes).map_err(|e| {
            ReleaseError::Zip { path: place.into(), message: format!("{name}: {e}") }
        })?;
        if bytes.len() as u64 > MAX_SHARD_BYTES {
            return Err(ReleaseError::TooLarge { name, place: place.into() });
        }
        shards.push(RawShard { name, bytes });
    }
    if shards.is_empty() {
        return Err(ReleaseError::NoShards { place: place.into() });
    }
    Ok((shards, ignored))
}

/// A name that would leave the extraction root or is rooted: checked on the raw name so that
/// no normalisation (`a/../b`) can make it pass.
fn unsafe_entry_name(name: &str) -> bool {
    let rooted = name.starts_with(['/', '\\'])
        || name.as_bytes().get(1) == Some(&b':')
        || name.contains('\0');
    rooted || name.split(['/', '\\']).any(|component| component == "..")
}

/// The `photos` shards of a folder (regular files directly in it).
pub fn shards_from_dir(dir: &Path) -> Result<Vec<RawShard>, ReleaseError> {
    let entries = fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    let mut shards = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !is_photos_shard(&name) || !path.is_file() {
            continue;
        }
        let size = fs::metadata(&path).map_err(|e| io_error(&path, e))?.len();
        if size > MAX_SHARD_BYTES {
            return Err(ReleaseError::TooLarge { name, place: dir.display().to_string() });
        }
        let bytes = fs::read(&path).map_err(|e| io_error(&path, e))?;
        shards.push(RawShard { name, bytes });
    }
    if shards.is_empty() {
        return Err(ReleaseError::NoShards { place: dir.display().to_string() });
    }
    Ok(shards)
}

/// Parse shards into one table, in shard-number order, keeping each id's first row.
pub fn parse_shards(mut shards: Vec<RawShard>) -> Result<Release, ReleaseError> {
    // Release order is shard number order, whatever the naming (`tsv000`, `csv001`, ...).
    shards.sort_by_cached_key(|s| (shard_number(&s.name), s.name.clone()));
    let mut release = Release::default();
    let mut seen = std::collections::HashSet::new();
    for shard in shards {
        let parsed = tsv::parse(&shard.name, &shard.bytes)?;
        let mut duplicates = 0;
        let rows = parsed.photos.len();
        for photo in parsed.photos {
            if seen.insert(photo.id().to_string()) {
                release.photos.push(photo);
            } else {
                duplicates += 1;
            }
        }
        let mode = match parsed.mode {
            tsv::Mode::Csv => "CSV quoting",
            tsv::Mode::Lines => "plain lines (quoting was unbalanced)",
        };
        release.notes.push(format!("read {} rows from {} as {mode}", rows, shard.name));
        if duplicates > 0 {
            release.notes.push(format!(
                "{}: {duplicates} rows repeat an id already read; the first row is kept",
                shard.name
            ));
        }
        if !parsed.malformed.is_empty() {
            release.notes.push(format!(
                "{}: {} rows with the wrong number of fields left out (lines {:?})",
                shard.name,
                parsed.malformed.len(),
                parsed.malformed
            ));
        }
    }
    Ok(release)
}

/// Read a release from a zip file or a folder of shards.
pub fn read(path: &Path) -> Result<Release, ReleaseError> {
    let (shards, ignored) =
        if path.is_dir() { (shards_from_dir(path)?, Vec::new()) } else { shards_from_zip(path)? };
    let mut release = parse_shards(shards)?;
    for entry in &ignored {
        release.notes.push(format!("ignored zip entry `{}`: {}", entry.name, entry.reason));
    }
    release.ignored = ignored;
    Ok(release)
}

fn io_error(path: &Path, source: std::io::Error) -> ReleaseError {
    ReleaseError::Io { path: path.display().to_string(), source }
}

#[cfg(test)]
mod tests {
    use std::io::{Cursor, Write};

    use zip::write::SimpleFileOptions;

    use super::*;

    const SHARD: &[u8] = b"photo_id\tphoto_image_url\nid-1\thttps://i/1\n";

    fn zip_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, bytes) in entries {
            writer.start_file(*name, SimpleFileOptions::default()).unwrap();
            writer.write_all(bytes).unwrap();
        }
        writer.finish().unwrap().into_inner()
    }

    fn names(shards: &[RawShard]) -> Vec<&str> {
        shards.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn recognises_both_shard_namings_only() {
        for yes in ["photos.tsv000", "photos.csv012", "photos.tsv"] {
            assert!(is_photos_shard(yes), "{yes}");
        }
        for no in ["keywords.tsv000", "photos.tsv000.bak", "photos.json", "xphotos.tsv000"] {
            assert!(!is_photos_shard(no), "{no}");
        }
    }

    #[test]
    fn reads_shards_at_any_safe_depth_and_skips_other_tables() {
        let zip = zip_with(&[
            ("photos.tsv000", SHARD),
            ("lite/photos.csv001", SHARD),
            ("keywords.tsv000", b"x"),
        ]);
        let (shards, ignored) = shards_from_zip_reader(Cursor::new(zip), "z").unwrap();
        assert_eq!(names(&shards), ["photos.tsv000", "lite/photos.csv001"]);
        assert!(ignored.is_empty());
    }

    #[test]
    fn traversal_and_absolute_entries_are_ignored() {
        let zip = zip_with(&[
            ("photos.tsv000", SHARD),
            ("../photos.tsv001", SHARD),
            ("a/../../photos.tsv002", SHARD),
            ("/etc/photos.tsv003", SHARD),
            ("C:/photos.tsv004", SHARD),
        ]);
        let (shards, ignored) = shards_from_zip_reader(Cursor::new(zip), "z").unwrap();
        assert_eq!(names(&shards), ["photos.tsv000"]);
        assert_eq!(ignored.len(), 4, "{ignored:?}");
    }

    #[test]
    fn a_zip_without_shards_is_a_clear_error() {
        let zip = zip_with(&[("keywords.tsv000", b"x")]);
        let err = shards_from_zip_reader(Cursor::new(zip), "lite.zip").unwrap_err();
        assert!(err.to_string().starts_with("lite.zip holds no `photos` shard"), "{err}");
        let err = shards_from_zip_reader(Cursor::new(b"not a zip".to_vec()), "x.zip").unwrap_err();
        assert!(err.to_string().contains("not a readable zip"), "{err}");
    }

    #[test]
    fn shards_are_read_in_number_order_and_ids_deduplicated() {
        let shards = vec![
            RawShard {
                name: "photos.tsv001".into(),
                bytes: b"photo_id\tphoto_image_url\nb\tu\na\tv\n".to_vec(),
            },
            RawShard {
                name: "photos.csv002".into(),
                bytes: b"photo_id\tphoto_image_url\nc\tu\n".to_vec(),
            },
            RawShard {
                name: "photos.tsv000".into(),
                bytes: b"photo_id\tphoto_image_url\na\tu\n".to_vec(),
            },
        ];
        let release = parse_shards(shards).unwrap();
        let ids: Vec<&str> = release.photos.iter().map(Photo::id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(release.photos[0].get("photo_image_url"), Some("u"));
        assert!(release.notes.iter().any(|n| n.contains("repeat an id")), "{:?}", release.notes);
    }
}
