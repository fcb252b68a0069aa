//! Where stages run and what they ask for: `executor:`, `resources:`, `device:` (the
//! pipeline's, inherited by each stage unless it sets its own) and `remote:`.

use super::*;

/// The pipeline-level placement settings a stage inherits unless it sets its own.
pub(super) struct Placement<'a> {
    pub(super) executor: ExecutorChoice,
    pub(super) resources: &'a Resources,
    pub(super) device: DeviceChoice,
}

impl Validator<'_> {
    /// `remote: s3://bucket/prefix`, or a mapping with `url` and connection options.
    pub(super) fn remote_settings(
        &mut self,
        value: &Yaml,
    ) -> Option<crate::spec::remote_settings::RemoteSettings> {
        use crate::spec::remote_settings::{parse_url, RemoteSettings};
        const KEYS: &[&str] = &["url", "endpoint", "region", "read_only", "allow_http"];
        let top = [key("remote")];
        let mut settings = RemoteSettings::default();
        match value {
            Yaml::String(url) => settings.url = Some(url.clone()),
            Yaml::Mapping(_) => {
                for (k, v) in self.mapping(value, &top, "`remote`", Some(KEYS)) {
                    let path = [key("remote"), key(&k)];
                    let what = format!("`remote.{k}`");
                    match k.as_str() {
                        "read_only" | "allow_http" => {
                            let Yaml::Bool(b) = v else {
                                let found = type_name(v);
                                self.err_value(
                                    &path,
                                    format!("{what} must be true or false, found {found}"),
                                );
                                continue;
                            };
                            if k == "read_only" {
                                settings.read_only = Some(*b);
                            } else {
                                settings.allow_http = Some(*b);
                            }
                        }
                        _ => {
                            let Some(s) = self.string(v, &path, &what) else { continue };
                            match k.as_str() {
                                "url" => settings.url = Some(s),
                                "endpoint" => settings.endpoint = Some(s),
                                _ => settings.region = Some(s),
                            }
                        }
                    }
                }
            }
            other => {
                let found = type_name(other);
                self.err_value(
                    &top,
                    format!("`remote` must be an s3:// URL or a mapping, found {found}"),
                )
                .help = Some(
                    "write `remote: s3://bucket/prefix`, or `remote: {url: ..., endpoint: ...}`"
                        .into(),
                );
                return None;
            }
        }
        let url_path: Vec<Seg> = if matches!(value, Yaml::Mapping(_)) {
            vec![key("remote"), key("url")]
        } else {
            top.to_vec()
        };
        match &settings.url {
            Some(url) => {
                if let Err(e) = parse_url(url) {
                    self.err_value(&url_path, e);
                    return None;
                }
            }
            None => {
                self.err_value(&top, "`remote` has no `url`").help =
                    Some("add `url: s3://bucket/prefix`".into());
                return None;
            }
        }
        if let Some(endpoint) = &settings.endpoint {
            if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
                self.err_value(
                    &[key("remote"), key("endpoint")],
                    format!("`remote.endpoint` `{endpoint}` is not an http(s) URL"),
                );
                return None;
            }
        }
        Some(settings)
    }

    /// `executor: local | slurm`.
    pub(super) fn executor_choice(&mut self, value: &Yaml, path: &[Seg]) -> Option<ExecutorChoice> {
        let name = self.string(value, path, "`executor`")?;
        let choice = ExecutorChoice::parse(&name);
        if choice.is_none() {
            let e = self.err_value(path, format!("unknown executor `{name}`"));
            *e = e
                .clone()
                .label("unknown executor")
                .suggest(&name, ExecutorChoice::NAMES.iter().copied());
            if e.help.is_none() {
                e.help = Some(format!("executors: {}", ExecutorChoice::NAMES.join(", ")));
            }
        }
        choice
    }

    /// `device: auto | cpu | cuda | cuda:N`.
    pub(super) fn device_choice(&mut self, value: &Yaml, path: &[Seg]) -> Option<DeviceChoice> {
        let text = self.string(value, path, "`device`")?;
        match DeviceChoice::parse(&text) {
            Ok(choice) => Some(choice),
            Err(message) => {
                let e = self.err_value(path, message);
                *e = e.clone().label("unknown device");
                None
            }
        }
    }

    /// `resources: {cpus, gpus, mem, time, partition}`: every field optional, each checked.
    pub(super) fn resources(&mut self, value: &Yaml, path: &[Seg]) -> Resources {
        let mut r = Resources::default();
        for (k, v) in self.mapping(value, path, "`resources`", Some(RESOURCE_KEYS)) {
            let mut p = path.to_vec();
            p.push(key(&k));
            let what = format!("`resources.{k}`");
            match k.as_str() {
                "cpus" | "gpus" => {
                    let (min, max) = if k == "cpus" { (1, 1024) } else { (0, 64) };
                    match v.as_u64().filter(|n| (min..=max).contains(n)) {
                        Some(n) if k == "cpus" => r.cpus = Some(n as u32),
                        Some(n) => r.gpus = Some(n as u32),
                        None => {
                            self.err_value(
                                &p,
                                format!("{what} must be an integer between {min} and {max}"),
                            );
                        }
                    }
                }
                _ => {
                    // `mem: 2048` and `time: 90` are numbers in YAML but words to Slurm.
                    let text = match v {
                        Yaml::Number(n) => n.to_string(),
                        other => match self.string(other, &p, &what) {
                            Some(s) => s,
                            None => continue,
                        },
                    };
                    let checked = match k.as_str() {
                        "mem" => resources::check_mem(&text).map(|m| r.mem = Some(m)),
                        "time" => resources::check_time(&text).map(|t| r.time = Some(t)),
                        _ => resources::check_partition(&text).map(|s| r.partition = Some(s)),
                    };
                    if let Err(message) = checked {
                        self.err_value(&p, format!("{what}: {message}"));
                    }
                }
            }
        }
        r
    }

    /// Where a stage runs: its own `executor`/`resources`/`device` over the pipeline's.
    pub(super) fn placement(
        &mut self,
        stage: &mut Stage,
        raw: &Yaml,
        path: &[Seg],
        defaults: &Placement,
    ) {
        let at = |k: &str| {
            let mut p = path.to_vec();
            p.push(key(k));
            p
        };
        let field = |k: &str| match raw {
            Yaml::Mapping(map) => map.get(k),
            _ => None,
        };
        stage.executor = match field("executor") {
            Some(v) => self.executor_choice(v, &at("executor")).unwrap_or(defaults.executor),
            None => defaults.executor,
        };
        stage.device = match field("device") {
            Some(v) => self.device_choice(v, &at("device")).unwrap_or(defaults.device),
            None => defaults.device,
        };
        let own = match field("resources") {
            Some(v) => self.resources(v, &at("resources")),
            None => Resources::default(),
        };
        stage.resources = defaults.resources.overlaid(&own);
    }
}
