//! Where models are cached and fetched from, read once from the environment the way the Python
//! `huggingface_hub` library reads it, so sdpipe and Python tools share one cache.
//!
//! Callers pass a [`HubConfig`] explicitly rather than having the resolver read the environment
//! itself: tests build their own without touching the process environment, which other tests
//! read concurrently.

use std::path::PathBuf;

/// The public Hugging Face hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Everything the resolver needs to know about the outside world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The hub cache (`models--org--name/{refs,snapshots,blobs}` live here).
    pub cache_dir: PathBuf,
    /// Base URL of the hub API, without a trailing slash.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` for gated or private repositories.
    pub token: Option<String>,
    /// Never touch the network: only local folders and the cache are used.
    pub offline: bool,
}

impl HubConfig {
    /// The configuration the process environment describes (see [`HubConfig::from_vars`]).
    pub fn from_env() -> HubConfig {
        HubConfig::from_vars(|name| std::env::var(name).ok())
    }

    /// The configuration described by `var` (an environment lookup), with the same precedence
    /// as `huggingface_hub`:
    ///
    /// - cache: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
    ///   else `~/.cache/huggingface/hub`;
    /// - endpoint: `HF_ENDPOINT`, else `https://huggingface.co`;
    /// - token: `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else `$HF_HOME/token` (what
    ///   `huggingface-cli login` writes);
    /// - offline: `HF_HUB_OFFLINE` set to 1, true, yes or on (any case).
    ///
    /// Empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> HubConfig {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                var("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/")).join(".cache")
            });
            cache.join("huggingface")
        });
        let cache_dir =
            var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token = var("HF_TOKEN").map(|t| t.trim().to_string()).or_else(|| {
            let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or(hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v));
        HubConfig { cache_dir, endpoint, token, offline }
    }
}

/// `huggingface_hub`'s reading of boolean environment variables.
fn is_true(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> HubConfig {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubConfig::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_to_the_home_cache_and_the_public_hub() {
        let c = config(&[("HOME", "/home/u")]);
        assert_eq!(c.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        assert!(!c.offline);
    }

    #[test]
    fn hf_hub_cache_wins_over_hf_home() {
        let c = config(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/cache")]);
        assert_eq!(c.cache_dir, PathBuf::from("/cache"));
        assert_eq!(config(&[("HF_HOME", "/hf")]).cache_dir, PathBuf::from("/hf/hub"));
    }

    #[test]
    fn endpoint_loses_its_trailing_slash() {
        assert_eq!(
            config(&[("HF_ENDPOINT", "http://127.0.0.1:9/")]).endpoint,
            "http://127.0.0.1:9"
        );
    }

    #[test]
    fn offline_accepts_the_usual_spellings_of_true() {
        for v in ["1", "true", "TRUE", "yes", "On"] {
            assert!(config(&[("HF_HUB_OFFLINE", v)]).offline, "{v}");
        }
        for v in ["0", "false", "no", ""] {
            assert!(!config(&[("HF_HUB_OFFLINE", v)]).offline, "{v}");
        }
    }

    #[test]
    fn token_comes_from_hf_token_else_the_login_file() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_file\n").unwrap();
        let home_str = home.path().to_str().unwrap();
        assert_eq!(config(&[("HF_HOME", home_str)]).token.as_deref(), Some("hf_file"));
        let c = config(&[("HF_HOME", home_str), ("HF_TOKEN", "hf_env")]);
        assert_eq!(c.token.as_deref(), Some("hf_env"));
    }
}
