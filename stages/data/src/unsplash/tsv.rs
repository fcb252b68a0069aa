//! The `photos` table of an Unsplash Lite release: its 31 columns and the parsing of one shard.
//!
//! Shards are tab-separated with a header row. Unsplash's own loaders read them as CSV with a
//! tab delimiter (PostgreSQL `FORMAT csv`, pandas `sep='\t'`), so a field holding a tab, a
//! newline or a leading quote is wrapped in double quotes with inner quotes doubled. Quotes in the
//! middle of an unquoted field are literal. A writer that did *not* quote would make a field
//! starting with a stray quote swallow the rows after it under CSV rules; that is detected (rows
//! stop having the header's field count) and such a shard is re-read line by line instead.
//! Columns are mapped by header name, never by position, so older releases with fewer columns
//! and any column order read the same.

use std::collections::HashMap;

use thiserror::Error;

/// The `photos` columns of the current Lite release, in the order Unsplash documents them.
pub const COLUMNS: [&str; 31] = [
    "photo_id",
    "photo_url",
    "photo_image_url",
    "photo_submitted_at",
    "photo_featured",
    "photo_width",
    "photo_height",
    "photo_aspect_ratio",
    "photo_description",
    "photographer_username",
    "photographer_first_name",
    "photographer_last_name",
    "exif_camera_make",
    "exif_camera_model",
    "exif_iso",
    "exif_aperture_value",
    "exif_focal_length",
    "exif_exposure_time",
    "photo_location_name",
    "photo_location_latitude",
    "photo_location_longitude",
    "photo_location_country",
    "photo_location_city",
    "stats_views",
    "stats_downloads",
    "ai_description",
    "ai_primary_landmark_name",
    "ai_primary_landmark_latitude",
    "ai_primary_landmark_longitude",
    "ai_primary_landmark_confidence",
    "blur_hash",
];

/// Columns without which a row cannot be downloaded at all.
const REQUIRED: [&str; 2] = ["photo_id", "photo_image_url"];

/// One row of the `photos` table: every known column, `None` where the field is empty or the
/// shard lacks the column.
#[derive(Debug, Clone, PartialEq)]
pub struct Photo {
    fields: [Option<String>; 31],
}

impl Photo {
    /// The field of the named column (one of [`COLUMNS`]).
    pub fn get(&self, column: &str) -> Option<&str> {
        let index = COLUMNS.iter().position(|c| *c == column);
        debug_assert!(index.is_some(), "unknown column {column}");
        self.fields[index?].as_deref()
    }

    pub fn id(&self) -> &str {
        self.get("photo_id").unwrap_or_default()
    }

    /// Every column with its value, in documented order.
    pub fn columns(&self) -> impl Iterator<Item = (&'static str, Option<&str>)> {
        COLUMNS.iter().copied().zip(self.fields.iter().map(Option::as_deref))
    }

    /// The photographer's display name, "First Last", or `None` if both parts are empty.
    pub fn photographer_name(&self) -> Option<String> {
        let parts: Vec<&str> = ["photographer_first_name", "photographer_last_name"]
            .iter()
            .filter_map(|c| self.get(c))
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }

    /// A positive integer column (`photo_width`, `photo_height`).
    pub fn dimension(&self, column: &str) -> Option<u64> {
        self.get(column)?.parse::<f64>().ok().filter(|v| *v > 0.0).map(|v| v as u64)
    }
}

/// How a shard was read; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Csv,
    Lines,
}

/// A parsed shard: its rows, how it was read, and the 1-based line numbers of rows that had
/// the wrong number of fields and were left out.
#[derive(Debug)]
pub struct Shard {
    pub photos: Vec<Photo>,
    pub mode: Mode,
    pub malformed: Vec<usize>,
}

#[derive(Debug, Error, PartialEq)]
pub enum TsvError {
    #[error("{shard} is empty (no header row)")]
    Empty { shard: String },
    #[error("{shard} has no `{column}` column (its header is: {header})")]
    MissingColumn { shard: String, column: &'static str, header: String },
}

/// Parse one `photos` shard named `shard` (used in messages only).
pub fn parse(shard: &str, bytes: &[u8]) -> Result<Shard, TsvError> {
    let csv_rows = split_csv(bytes);
    let header = csv_rows.first().ok_or_else(|| TsvError::Empty { shard: shard.into() })?;
    let map = column_map(shard, header)?;
    let width = header.1.len();

    // CSV rules unless they leave rows malformed that plain lines would not (a stray quote).
    let well_formed =
        |rows: &[(usize, Vec<String>)]| rows.iter().filter(|(_, r)| r.len() == width).count();
    let csv_body: Vec<_> = csv_rows.into_iter().skip(1).collect();
    let (mode, rows) = if well_formed(&csv_body) == csv_body.len() {
        (Mode::Csv, csv_body)
    } else {
        let line_body: Vec<_> = split_lines(bytes).into_iter().skip(1).collect();
        if well_formed(&line_body) > well_formed(&csv_body) {
            (Mode::Lines, line_body)
        } else {
            (Mode::Csv, csv_body)
        }
    };

    let mut photos = Vec::with_capacity(rows.len());
    let mut malformed = Vec::new();
    for (line, row) in rows {
        if row.len() != width {
            malformed.push(line);
            continue;
        }
        let mut fields: [Option<String>; 31] = Default::default();
        for (value, slot) in row.into_iter().zip(&map) {
            if let Some(index) = slot {
                fields[*index] = Some(value).filter(|v| !v.is_empty());
            }
        }
        photos.push(Photo { fields });
    }
    Ok(Shard { photos, mode, malformed })
}

/// For each header field, the index in [`COLUMNS`] it fills (unknown columns are ignored:
/// a later release may add some).
fn column_map(shard: &str, header: &(usize, Vec<String>)) -> Result<Vec<Option<usize>>, TsvError> {
    let names: Vec<&str> =
        header.1.iter().map(|h| h.trim_start_matches('\u{feff}').trim()).collect();
    let index: HashMap<&str, usize> = COLUMNS.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    for column in REQUIRED {
        if !names.contains(&column) {
            return Err(TsvError::MissingColumn {
                shard: shard.into(),
                column,
                header: names.join(", "),
            });
        }
    }
    Ok(names.iter().map(|n| index.get(n).copied()).collect())
}

/// Rows under CSV rules (tab delimiter, `"` quoting with doubled quotes), with the line each
/// row starts on.
fn split_csv(bytes: &[u8]) -> Vec<(usize, Vec<String>)> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .has_headers(false)
        .flexible(true)
        .quoting(true)
        .double_quote(true)
        .from_reader(bytes);
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    // The csv crate only errors on I/O (none: this reads from memory) or on UTF-8 in
    // `StringRecord`s, which `ByteRecord` avoids; stop at an error rather than loop on it.
    while let Ok(true) = reader.read_byte_record(&mut record) {
        let line = record.position().map_or(0, |p| p.line() as usize);
        let fields = record.iter().map(|f| String::from_utf8_lossy(f).into_owned());
        rows.push((line, fields.collect()));
    }
    rows
}

/// Rows as plain lines split on tabs; a field wholly wrapped in quotes is unquoted.
fn split_lines(bytes: &[u8]) -> Vec<(usize, Vec<String>)> {
    String::from_utf8_lossy(bytes)
        .split('\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix('\r').unwrap_or(line)))
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| (i, line.split('\t').map(unquote).collect()))
        .collect()
}

fn unquote(field: &str) -> String {
    match field.strip_prefix('"').and_then(|f| f.strip_suffix('"')) {
        Some(inner) if field.len() >= 2 => inner.replace("\"\"", "\""),
        _ => field.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard with the given header columns and rows (fields joined by tabs).
    fn shard(header: &[&str], rows: &[&[&str]]) -> Vec<u8> {
        let mut text = header.join("\t");
        for row in rows {
            text.push('\n');
            text.push_str(&row.join("\t"));
        }
        text.push('\n');
        text.into_bytes()
    }

    fn full_row(id: &str, description: &str) -> Vec<String> {
        COLUMNS
            .iter()
            .map(|c| match *c {
                "photo_id" => id.to_string(),
                "photo_image_url" => format!("https://images.example/{id}"),
                "photo_description" => description.to_string(),
                "photographer_first_name" => "Ada".into(),
                "photo_width" => "4000".into(),
                _ => String::new(),
            })
            .collect()
    }

    fn full_shard(rows: &[Vec<String>]) -> Vec<u8> {
        let rows: Vec<Vec<&str>> =
            rows.iter().map(|r| r.iter().map(String::as_str).collect()).collect();
        let rows: Vec<&[&str]> = rows.iter().map(Vec::as_slice).collect();
        shard(&COLUMNS, &rows)
    }

    #[test]
    fn maps_columns_by_header_name_in_any_order() {
        let bytes = shard(
            &["photo_image_url", "ai_description", "photo_id"],
            &[&["https://i/a", "a lake", "a-1"], &["https://i/b", "", "b_2"]],
        );
        let parsed = parse("photos.tsv000", &bytes).unwrap();
        assert_eq!(parsed.mode, Mode::Csv);
        let [a, b] = &parsed.photos[..] else { panic!("{parsed:?}") };
        assert_eq!((a.id(), a.get("photo_image_url")), ("a-1", Some("https://i/a")));
        assert_eq!(a.get("ai_description"), Some("a lake"));
        assert_eq!(b.get("ai_description"), None, "empty fields are None");
        assert_eq!(b.get("blur_hash"), None, "absent columns are None");
    }

    #[test]
    fn reads_all_31_columns() {
        let values: Vec<String> = (0..31).map(|i| format!("v{i}")).collect();
        let parsed = parse("photos.tsv000", &full_shard(std::slice::from_ref(&values))).unwrap();
        let got: Vec<Option<&str>> = parsed.photos[0].columns().map(|(_, v)| v).collect();
        let want: Vec<Option<&str>> = values.iter().map(|v| Some(v.as_str())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn csv_quoted_fields_keep_their_quotes_tabs_and_newlines() {
        let mut row = full_row("q-1", "");
        row[8] = "\"She said \"\"hello\"\"\tand\nleft\"".into();
        let parsed = parse("photos.tsv000", &full_shard(&[row, full_row("q-2", "x")])).unwrap();
        assert_eq!(parsed.mode, Mode::Csv);
        assert_eq!(
            parsed.photos[0].get("photo_description"),
            Some("She said \"hello\"\tand\nleft")
        );
        assert_eq!(parsed.photos[1].id(), "q-2");
    }

    #[test]
    fn quotes_inside_unquoted_fields_are_literal() {
        let rows = [
            full_row("s-1", "the \"best\" view of the lake"),
            full_row("s-2", "a 12\" vinyl, a 6' board"),
        ];
        let parsed = parse("photos.tsv000", &full_shard(&rows)).unwrap();
        assert_eq!(parsed.mode, Mode::Csv);
        assert_eq!(
            parsed.photos[0].get("photo_description"),
            Some("the \"best\" view of the lake")
        );
        assert_eq!(parsed.photos[1].get("photo_description"), Some("a 12\" vinyl, a 6' board"));
    }

    #[test]
    fn an_unbalanced_leading_quote_falls_back_to_lines() {
        let rows = [
            full_row("u-1", "\"Best day ever"),
            full_row("u-2", "plain"),
            full_row("u-3", "also plain"),
        ];
        let parsed = parse("photos.tsv000", &full_shard(&rows)).unwrap();
        assert_eq!(parsed.mode, Mode::Lines);
        let ids: Vec<&str> = parsed.photos.iter().map(Photo::id).collect();
        assert_eq!(ids, ["u-1", "u-2", "u-3"]);
        assert_eq!(parsed.photos[0].get("photo_description"), Some("\"Best day ever"));
    }

    #[test]
    fn rows_with_the_wrong_field_count_are_listed_not_read() {
        let mut bytes = full_shard(&[full_row("ok-1", "")]);
        bytes.extend_from_slice(b"short\trow\n");
        bytes.extend_from_slice(&full_shard(&[full_row("ok-2", "")])[COLUMNS.join("\t").len()..]);
        let parsed = parse("photos.tsv000", &bytes).unwrap();
        let ids: Vec<&str> = parsed.photos.iter().map(Photo::id).collect();
        assert_eq!(ids, ["ok-1", "ok-2"]);
        assert_eq!(parsed.malformed, [3]);
    }

    #[test]
    fn crlf_line_endings_and_a_bom_are_tolerated() {
        let text = "\u{feff}photo_id\tphoto_image_url\r\nc-1\thttps://i/c\r\n";
        let parsed = parse("photos.csv000", text.as_bytes()).unwrap();
        assert_eq!(parsed.photos.len(), 1);
        assert_eq!(parsed.photos[0].get("photo_image_url"), Some("https://i/c"));
    }

    #[test]
    fn a_missing_required_column_names_the_shard_and_column() {
        let err = parse("photos.tsv003", b"photo_id\tphoto_url\nx\ty\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "photos.tsv003 has no `photo_image_url` column (its header is: photo_id, photo_url)"
        );
        assert!(matches!(parse("photos.tsv004", b""), Err(TsvError::Empty { .. })));
    }

    #[test]
    fn photographer_name_and_dimensions() {
        let parsed = parse("p", &full_shard(&[full_row("d-1", "")])).unwrap();
        let photo = &parsed.photos[0];
        assert_eq!(photo.photographer_name().as_deref(), Some("Ada"));
        assert_eq!(photo.dimension("photo_width"), Some(4000));
        assert_eq!(photo.dimension("photo_height"), None);
    }
}
