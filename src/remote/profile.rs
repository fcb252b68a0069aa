//! Credentials and region from the AWS shared files (`~/.aws/credentials`, `~/.aws/config`) for
//! the profile `AWS_PROFILE` names, else `default`: what the AWS CLI and SDKs use when the
//! environment holds no keys. `object_store` reads only the environment and the cloud metadata
//! services, so sdpipe reads these files itself and hands the keys over.
//!
//! Static keys only (with an optional session token). A profile that gets its credentials some
//! other way (SSO, `credential_process`, an assumed role) is reported as unsupported with the
//! command that exports its credentials, rather than silently falling through to another source.

use std::path::{Path, PathBuf};

use ini::{Ini, ParseOption};

/// What a profile supplies.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub keys: Option<Keys>,
    pub region: Option<String>,
}

#[derive(PartialEq, Eq)]
pub struct Keys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// Never print a secret, not even in a debug dump.
impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

/// Settings that mean "credentials come from elsewhere", which sdpipe does not resolve.
const INDIRECT: [&str; 5] =
    ["sso_session", "sso_start_url", "credential_process", "role_arn", "web_identity_token_file"];

/// The profile's keys and region; `Ok(None)` when neither file mentions it and it was not
/// asked for by name (the default profile is optional, a named one is not). `env` reads a
/// variable; `home` is the home directory.
pub fn load(
    env: impl Fn(&str) -> Option<String>,
    home: Option<&Path>,
) -> Result<Option<Profile>, String> {
    let named = env("AWS_PROFILE").filter(|p| !p.is_empty());
    let name = named.clone().unwrap_or_else(|| "default".to_string());
    let file = |var: &str, default: &str| -> Option<PathBuf> {
        env(var)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(default)))
    };
    let credentials = read(file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"))?;
    let config = read(file("AWS_CONFIG_FILE", ".aws/config"))?;

    // The credentials file names sections `[name]`; the config file `[profile name]`, except
    // `[default]`. For a key in both, the credentials file wins (as in the AWS SDKs).
    let config_section = if name == "default" { name.clone() } else { format!("profile {name}") };
    let sections: Vec<&ini::Properties> = [
        credentials.as_ref().and_then(|(_, ini)| ini.section(Some(name.as_str()))),
        config.as_ref().and_then(|(_, ini)| ini.section(Some(config_section.as_str()))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if sections.is_empty() {
        return match named {
            None => Ok(None),
            Some(_) => Err(format!(
                "AWS_PROFILE names profile `{name}`, which is in neither {} nor {}",
                shown(credentials.as_ref().map(|f| &f.0), "the credentials file"),
                shown(config.as_ref().map(|f| &f.0), "the config file"),
            )),
        };
    }
    let get = |key: &str| {
        sections.iter().find_map(|s| s.get(key)).map(str::trim).filter(|v| !v.is_empty())
    };
    let keys = match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(id), Some(secret)) => Some(Keys {
            access_key_id: id.to_string(),
            secret_access_key: secret.to_string(),
            session_token: get("aws_session_token").map(str::to_string),
        }),
        (Some(_), None) | (None, Some(_)) => {
            return Err(format!(
                "AWS profile `{name}` has only one of aws_access_key_id and aws_secret_access_key"
            ))
        }
        (None, None) => {
            if let Some(setting) = INDIRECT.iter().find(|k| get(k).is_some()) {
                return Err(format!(
                    "AWS profile `{name}` gets its credentials through `{setting}`, which sdpipe \
                     does not resolve; export them into the environment first: \
                     eval \"$(aws configure export-credentials --profile {name} --format env)\""
                ));
            }
            None
        }
    };
    Ok(Some(Profile { name, keys, region: get("region").map(str::to_string) }))
}

/// The file parsed, or `None` when it does not exist.
fn read(path: Option<PathBuf>) -> Result<Option<(PathBuf, Ini)>, String> {
    let Some(path) = path else { return Ok(None) };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    // Secrets are taken literally: no quotes, no backslash escapes.
    let literal = ParseOption { enabled_quote: false, enabled_escape: false, ..Default::default() };
    let ini = Ini::load_from_str_opt(&text, literal)
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    Ok(Some((path, ini)))
}

fn shown(path: Option<&PathBuf>, otherwise: &str) -> String {
    path.map_or_else(|| otherwise.to_string(), |p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Home {
        dir: tempfile::TempDir,
    }

    impl Home {
        fn new(credentials: Option<&str>, config: Option<&str>) -> Home {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join(".aws")).unwrap();
            for (name, text) in [("credentials", credentials), ("config", config)] {
                if let Some(text) = text {
                    std::fs::write(dir.path().join(".aws").join(name), text).unwrap();
                }
            }
            Home { dir }
        }

        fn load(&self, vars: &[(&str, &str)]) -> Result<Option<Profile>, String> {
            let vars: Vec<(String, String)> =
                vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let env = move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            load(env, Some(self.dir.path()))
        }
    }

    const CREDENTIALS: &str = "[default]\naws_access_key_id = AKIADEFAULT\n\
        aws_secret_access_key = s3cr3t/with+slash\\and\"quote\n\n\
        [team]\naws_access_key_id=AKIATEAM\naws_secret_access_key=teamsecret\n\
        aws_session_token = tok\n";
    const CONFIG: &str = "[default]\nregion = eu-west-1\n\n[profile team]\nregion = us-west-2\n\n\
        [profile sso]\nsso_session = corp\nregion = eu-central-1\n";

    fn keys(p: &Profile) -> (&str, &str, Option<&str>) {
        let k = p.keys.as_ref().expect("keys");
        (&k.access_key_id, &k.secret_access_key, k.session_token.as_deref())
    }

    #[test]
    fn the_default_profile_gives_keys_from_credentials_and_region_from_config() {
        let p = Home::new(Some(CREDENTIALS), Some(CONFIG)).load(&[]).unwrap().unwrap();
        assert_eq!(keys(&p), ("AKIADEFAULT", "s3cr3t/with+slash\\and\"quote", None));
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn aws_profile_selects_a_named_profile_and_its_config_section() {
        let p = Home::new(Some(CREDENTIALS), Some(CONFIG)).load(&[("AWS_PROFILE", "team")]);
        let p = p.unwrap().unwrap();
        assert_eq!(keys(&p), ("AKIATEAM", "teamsecret", Some("tok")));
        assert_eq!(p.region.as_deref(), Some("us-west-2"));
    }

    #[test]
    fn no_files_and_no_named_profile_is_no_profile() {
        assert_eq!(Home::new(None, None).load(&[]).unwrap(), None);
    }

    #[test]
    fn a_named_profile_that_does_not_exist_is_an_error_naming_it() {
        let err = Home::new(Some(CREDENTIALS), None).load(&[("AWS_PROFILE", "nope")]).unwrap_err();
        assert!(err.contains("`nope`") && err.contains(".aws/credentials"), "{err}");
    }

    #[test]
    fn an_sso_profile_is_refused_with_the_export_command() {
        let err = Home::new(None, Some(CONFIG)).load(&[("AWS_PROFILE", "sso")]).unwrap_err();
        assert!(err.contains("sso_session") && err.contains("export-credentials"), "{err}");
    }

    #[test]
    fn a_half_written_key_pair_is_an_error() {
        let home = Home::new(Some("[default]\naws_access_key_id = AKIA\n"), None);
        assert!(home.load(&[]).unwrap_err().contains("only one of"));
    }

    #[test]
    fn the_file_locations_follow_the_aws_environment_variables() {
        let elsewhere = tempfile::tempdir().unwrap();
        let file = elsewhere.path().join("creds");
        std::fs::write(&file, "[default]\naws_access_key_id=A\naws_secret_access_key=B\n").unwrap();
        let p = Home::new(Some(CREDENTIALS), None)
            .load(&[("AWS_SHARED_CREDENTIALS_FILE", file.to_str().unwrap())])
            .unwrap()
            .unwrap();
        assert_eq!(keys(&p), ("A", "B", None));
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let p = Home::new(Some(CREDENTIALS), None).load(&[]).unwrap().unwrap();
        assert!(!format!("{p:?}").contains("s3cr3t"));
    }
}
