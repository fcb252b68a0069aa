//! The `remote:` setting as a pipeline or `sdpipe.toml` writes it, and the one check that
//! needs no environment (the URL's shape). Here, not in `remote`, because the spec and the
//! project settings parse it; `remote` resolves it against the environment and connects.

/// The `remote:` setting as written in a pipeline or `sdpipe.toml` (every field optional: the
/// environment may supply the rest).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSettings {
    /// `s3://bucket/prefix`.
    pub url: Option<String>,
    /// Endpoint URL for S3-compatible servers other than AWS (MinIO, Ceph, R2, ...).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Pull, never push.
    pub read_only: Option<bool>,
    /// Allow plain `http://` endpoints (a server on loopback or a private network).
    pub allow_http: Option<bool>,
}

impl RemoteSettings {
    /// These settings with each field `over` sets taking its place.
    pub fn overlaid_by(&self, over: Option<&RemoteSettings>) -> RemoteSettings {
        let Some(over) = over else { return self.clone() };
        RemoteSettings {
            url: over.url.clone().or_else(|| self.url.clone()),
            endpoint: over.endpoint.clone().or_else(|| self.endpoint.clone()),
            region: over.region.clone().or_else(|| self.region.clone()),
            read_only: over.read_only.or(self.read_only),
            allow_http: over.allow_http.or(self.allow_http),
        }
    }
}

/// Split `s3://bucket/some/prefix` into the bucket and the prefix (`some/prefix`).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        format!("remote `{url}` is not an S3 URL: write `s3://bucket` or `s3://bucket/prefix`")
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    // S3's bucket naming rules (the subset every S3-compatible server accepts).
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid_bucket {
        return Err(format!(
            "remote `{url}`: `{bucket}` is not a valid bucket name (3-63 lowercase letters, \
             digits, `.` and `-`)"
        ));
    }
    let parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| matches!(*p, "." | "..")) {
        return Err(format!("remote `{url}`: the prefix may not contain `.` or `..` segments"));
    }
    Ok((bucket.to_string(), parts.join("/")))
}
