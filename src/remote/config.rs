//! Where the shared cache is: the project's `[remote]` in `sdpipe.toml`, overridden field by
//! field by the pipeline's `remote:`, and that by `SDPIPE_REMOTE*` environment variables (so CI
//! can point at a bucket, or turn the remote off or read-only, without editing any file).

use crate::spec::remote_settings::{parse_url, RemoteSettings};

/// The environment variables that override [`RemoteSettings`], one per field.
pub const ENV_URL: &str = "SDPIPE_REMOTE";
pub const ENV_ENDPOINT: &str = "SDPIPE_REMOTE_ENDPOINT";
pub const ENV_REGION: &str = "SDPIPE_REMOTE_REGION";
pub const ENV_READ_ONLY: &str = "SDPIPE_REMOTE_READ_ONLY";
pub const ENV_ALLOW_HTTP: &str = "SDPIPE_REMOTE_ALLOW_HTTP";

/// A resolved, usable remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub read_only: bool,
    pub allow_http: bool,
}

impl RemoteConfig {
    /// The pipeline's settings with the environment's overrides applied; `None` when no URL is
    /// set or `SDPIPE_REMOTE` is `off`/`none`/empty. `env` reads a variable (`std::env::var`
    /// in the program, a map in tests).
    pub fn resolve(
        pipeline: Option<&RemoteSettings>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<RemoteConfig>, String> {
        let mut s = pipeline.cloned().unwrap_or_default();
        if let Some(url) = env(ENV_URL) {
            if matches!(url.trim(), "" | "off" | "none") {
                return Ok(None);
            }
            s.url = Some(url);
        }
        if let Some(v) = env(ENV_ENDPOINT) {
            s.endpoint = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = env(ENV_REGION) {
            s.region = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = env(ENV_READ_ONLY) {
            s.read_only = Some(parse_bool(ENV_READ_ONLY, &v)?);
        }
        if let Some(v) = env(ENV_ALLOW_HTTP) {
            s.allow_http = Some(parse_bool(ENV_ALLOW_HTTP, &v)?);
        }
        let Some(url) = s.url else {
            return Ok(None);
        };
        let (bucket, prefix) = parse_url(&url)?;
        if let Some(endpoint) = &s.endpoint {
            check_endpoint(endpoint)?;
        }
        Ok(Some(RemoteConfig {
            bucket,
            prefix,
            endpoint: s.endpoint,
            region: s.region,
            read_only: s.read_only.unwrap_or(false),
            allow_http: s.allow_http.unwrap_or(false),
        }))
    }

    /// `s3://bucket/prefix`, for messages.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{name}={value:?}: expected true or false")),
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        Ok(())
    } else {
        Err(format!(
            "remote endpoint `{endpoint}` must be a URL starting with https:// (or http:// with \
             `allow_http: true`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn a_url_splits_into_bucket_and_normalised_prefix() {
        assert_eq!(parse_url("s3://team-cache").unwrap(), ("team-cache".into(), "".into()));
        assert_eq!(
            parse_url("s3://team-cache//sd/exp1/").unwrap(),
            ("team-cache".into(), "sd/exp1".into())
        );
    }

    #[test]
    fn bad_urls_say_what_is_expected() {
        assert!(parse_url("https://x/y").unwrap_err().contains("s3://bucket"));
        assert!(parse_url("s3://Bad_Bucket/x").unwrap_err().contains("bucket name"));
        assert!(parse_url("s3://ok-bucket/../x").unwrap_err().contains(".."));
    }

    #[test]
    fn no_url_anywhere_means_no_remote() {
        assert_eq!(RemoteConfig::resolve(None, env(&[])).unwrap(), None);
    }

    #[test]
    fn environment_overrides_the_pipeline_field_by_field() {
        let pipeline = RemoteSettings {
            url: Some("s3://from-pipeline/p".into()),
            region: Some("eu-west-1".into()),
            ..Default::default()
        };
        let c = RemoteConfig::resolve(
            Some(&pipeline),
            env(&[(ENV_READ_ONLY, "1"), (ENV_ENDPOINT, "http://127.0.0.1:9000")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.bucket, "from-pipeline");
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert!(c.read_only);
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        let c = RemoteConfig::resolve(Some(&pipeline), env(&[(ENV_URL, "s3://other")]))
            .unwrap()
            .unwrap();
        assert_eq!(c.url(), "s3://other");
    }

    #[test]
    fn sdpipe_remote_off_disables_a_pipelines_remote() {
        let pipeline = RemoteSettings { url: Some("s3://bucket".into()), ..Default::default() };
        assert_eq!(RemoteConfig::resolve(Some(&pipeline), env(&[(ENV_URL, "off")])).unwrap(), None);
    }

    #[test]
    fn the_pipeline_overrides_the_projects_remote_field_by_field() {
        let project = RemoteSettings {
            url: Some("s3://team/cache".into()),
            endpoint: Some("http://minio:9000".into()),
            allow_http: Some(true),
            ..RemoteSettings::default()
        };
        let pipeline =
            RemoteSettings { url: Some("s3://team/other".into()), ..RemoteSettings::default() };
        let merged = project.overlaid_by(Some(&pipeline));
        assert_eq!(merged.url.as_deref(), Some("s3://team/other"));
        assert_eq!(merged.endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(merged.allow_http, Some(true));
        assert_eq!(project.overlaid_by(None), project);
    }

    #[test]
    fn an_unparseable_flag_is_an_error_not_a_guess() {
        let err =
            RemoteConfig::resolve(None, env(&[(ENV_URL, "s3://bucket"), (ENV_READ_ONLY, "maybe")]))
                .unwrap_err();
        assert!(err.contains(ENV_READ_ONLY));
    }
}
