//! Model resolution end to end: local folders, the cache, and downloads from a loopback hub.

use std::fs;
use std::path::Path;

use sdpipe_hub::testing::HubServer;
use sdpipe_hub::{resolve_with, HubConfig, HubError, Origin, Want};

const REPO: &str = "org/tiny";
const WANTS: &[Want<'static>] = &[Want::File("config.json"), Want::File("model.safetensors")];

/// A small "model": a config, some weights, a file in a subfolder.
fn model_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("config.json"), "{\"hidden_size\": 8}").unwrap();
    fs::write(dir.path().join("model.safetensors"), vec![7u8; 3000]).unwrap();
    fs::create_dir(dir.path().join("tokenizer")).unwrap();
    fs::write(dir.path().join("tokenizer/vocab.json"), "{}").unwrap();
    dir
}

fn config(cache: &Path, endpoint: &str) -> HubConfig {
    HubConfig {
        cache_dir: cache.to_path_buf(),
        endpoint: endpoint.to_string(),
        token: None,
        offline: false,
    }
}

#[test]
fn a_local_folder_is_used_as_it_is_without_any_request() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let spec = model.path().to_str().unwrap();
    let resolved =
        resolve_with(&config(cache.path(), &server.endpoint()), spec, "main", WANTS).unwrap();
    assert_eq!(resolved.origin, Origin::Local);
    assert_eq!(resolved.file("config.json").unwrap(), model.path().join("config.json"));
    assert_eq!(server.requests(), 0);
}

#[test]
fn a_local_folder_missing_a_file_is_an_error_naming_it() {
    let model = model_folder();
    fs::remove_file(model.path().join("model.safetensors")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_with(
        &config(cache.path(), "http://127.0.0.1:9"),
        model.path().to_str().unwrap(),
        "main",
        WANTS,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("missing model.safetensors"), "{text}");
    assert!(text.contains(&model.path().display().to_string()), "{text}");
}

#[test]
fn downloads_into_the_cache_in_the_hugging_face_layout() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wants =
        [Want::File("config.json"), Want::File("model.safetensors"), "tokenizer/vocab.json".into()];
    let resolved =
        resolve_with(&config(cache.path(), &server.endpoint()), REPO, "main", &wants).unwrap();

    assert_eq!(resolved.origin, Origin::Hub);
    assert_eq!(resolved.commit.as_deref(), Some(server.commit()));
    let repo_dir = cache.path().join("models--org--tiny");
    assert_eq!(fs::read_to_string(repo_dir.join("refs/main")).unwrap(), server.commit());
    assert_eq!(resolved.root, repo_dir.join("snapshots").join(server.commit()));
    for name in ["config.json", "model.safetensors", "tokenizer/vocab.json"] {
        let path = resolved.file(name).unwrap();
        assert_eq!(fs::read(path).unwrap(), fs::read(model.path().join(name)).unwrap(), "{name}");
        // Snapshot entries link into blobs/, as huggingface_hub writes them.
        assert!(fs::symlink_metadata(path).unwrap().file_type().is_symlink(), "{name}");
    }
    assert!(!repo_dir.join("refs").join(server.commit()).exists());
}

#[test]
fn a_cached_model_resolves_without_any_request() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(cache.path(), &server.endpoint());
    let first = resolve_with(&cfg, REPO, "main", WANTS).unwrap();
    let requests = server.requests();

    let again = resolve_with(&cfg, REPO, "main", WANTS).unwrap();
    assert_eq!(again.origin, Origin::Cache);
    assert_eq!(again.files, first.files);
    assert_eq!(server.requests(), requests);
}

#[test]
fn offline_resolves_from_the_cache_filled_online() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    resolve_with(&config(cache.path(), &server.endpoint()), REPO, "main", WANTS).unwrap();
    drop(server);

    let offline = HubConfig { offline: true, ..config(cache.path(), "http://127.0.0.1:9") };
    let resolved = resolve_with(&offline, REPO, "main", WANTS).unwrap();
    assert_eq!(resolved.origin, Origin::Cache);
    assert_eq!(fs::read(resolved.file("model.safetensors").unwrap()).unwrap(), vec![7u8; 3000]);
}

#[test]
fn the_cache_is_found_by_commit_hash_too() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    resolve_with(&config(cache.path(), &server.endpoint()), REPO, "main", WANTS).unwrap();
    let offline = HubConfig { offline: true, ..config(cache.path(), &server.endpoint()) };
    let resolved = resolve_with(&offline, REPO, server.commit(), WANTS).unwrap();
    assert_eq!(resolved.origin, Origin::Cache);
}

#[test]
fn offline_and_uncached_is_an_error_listing_files_and_places_without_any_request() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let offline = HubConfig { offline: true, ..config(cache.path(), &server.endpoint()) };
    let err = resolve_with(&offline, REPO, "main", WANTS).unwrap_err();
    assert_eq!(server.requests(), 0);

    let HubError::NotFound { needed, looked, .. } = &err else { panic!("{err}") };
    assert_eq!(needed, &["config.json", "model.safetensors"]);
    let places: Vec<&str> = looked.iter().map(|l| l.place.as_str()).collect();
    assert!(places[0].starts_with("local folder"), "{places:?}");
    assert_eq!(places[1], format!("Hugging Face cache {}", cache.path().display()));
    assert_eq!(places[2], format!("hub {}", server.endpoint()));
    let text = err.to_string();
    assert!(text.contains("config.json, model.safetensors"), "{text}");
    assert!(text.contains("HF_HUB_OFFLINE"), "{text}");
}

#[test]
fn a_repository_the_hub_does_not_have_is_not_found() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_with(&config(cache.path(), &server.endpoint()), "org/other", "main", WANTS)
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HubError::NotFound { .. }), "{text}");
    assert!(text.contains("HTTP 404"), "{text}");
}

#[test]
fn a_file_the_repository_lacks_is_named() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wants = [Want::File("config.json"), Want::File("tokenizer.json")];
    let err =
        resolve_with(&config(cache.path(), &server.endpoint()), REPO, "main", &wants).unwrap_err();
    assert!(err.to_string().contains("has no tokenizer.json"), "{err}");
}

#[test]
fn alternatives_and_optional_files_are_chosen_from_the_repository_listing() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wants = [
        Want::OneOf(&["model.safetensors.index.json", "model.safetensors"]),
        Want::Optional("generation_config.json"),
    ];
    let resolved =
        resolve_with(&config(cache.path(), &server.endpoint()), REPO, "main", &wants).unwrap();
    assert_eq!(resolved.files.keys().collect::<Vec<_>>(), ["model.safetensors"]);
}

#[test]
fn a_private_repository_needs_the_token() {
    let model = model_folder();
    let server = HubServer::serve_private(REPO, model.path(), "hf_secret").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let err =
        resolve_with(&config(cache.path(), &server.endpoint()), REPO, "main", WANTS).unwrap_err();
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");

    let with_token =
        HubConfig { token: Some("hf_secret".into()), ..config(cache.path(), &server.endpoint()) };
    let resolved = resolve_with(&with_token, REPO, "main", WANTS).unwrap();
    assert_eq!(resolved.origin, Origin::Hub);
}

#[test]
fn malformed_specs_are_rejected_before_looking_anywhere() {
    let cache = tempfile::tempdir().unwrap();
    let cfg = config(cache.path(), "http://127.0.0.1:9");
    for spec in ["", "org/na me", "org--x/y", "-org/x", "org/x."] {
        let err = resolve_with(&cfg, spec, "main", WANTS).unwrap_err();
        assert!(matches!(err, HubError::InvalidSpec { .. }), "{spec}: {err}");
    }
    let err = resolve_with(&cfg, REPO, "../main", WANTS).unwrap_err();
    assert!(err.to_string().contains("invalid revision"), "{err}");
}

#[test]
fn a_missing_path_is_not_sent_to_the_hub() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let spec = model.path().join("nope").display().to_string();
    let err =
        resolve_with(&config(cache.path(), &server.endpoint()), &spec, "main", WANTS).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(server.requests(), 0);
}

#[test]
fn a_file_is_not_a_model() {
    let model = model_folder();
    let cache = tempfile::tempdir().unwrap();
    let spec = model.path().join("config.json").display().to_string();
    let err = resolve_with(&config(cache.path(), "http://127.0.0.1:9"), &spec, "main", WANTS)
        .unwrap_err();
    assert!(matches!(err, HubError::InvalidSpec { .. }), "{err}");
}

/// The cache we fill is the one Python's `huggingface_hub` reads (skipped without it).
#[test]
fn python_huggingface_hub_finds_our_downloads_when_installed() {
    let has_hub = std::process::Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_hub {
        eprintln!("skipping: Python `huggingface_hub` is not installed");
        return;
    }
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    resolve_with(&config(cache.path(), &server.endpoint()), REPO, "main", WANTS).unwrap();
    let script = "import sys, huggingface_hub as h\n\
        p = h.try_to_load_from_cache(sys.argv[1], 'model.safetensors', cache_dir=sys.argv[2])\n\
        print(len(open(p, 'rb').read()))";
    let out = std::process::Command::new("python3")
        .args(["-c", script, REPO, &cache.path().display().to_string()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3000");
}

#[test]
fn resolving_locally_never_contacts_the_hub_and_says_a_run_would_download() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let config = config(cache.path(), &server.endpoint());
    let err = sdpipe_hub::resolve_local(&config, REPO, "main", WANTS).unwrap_err();
    assert!(matches!(err, HubError::NotLocal { .. }), "{err}");
    assert!(err.to_string().contains("`sdpipe run` will download it"), "{err}");
    assert_eq!(server.requests(), 0);

    // Once a run has filled the cache, the local resolution finds it.
    resolve_with(&config, REPO, "main", WANTS).unwrap();
    let requests = server.requests();
    let resolved = sdpipe_hub::resolve_local(&config, REPO, "main", WANTS).unwrap();
    assert_eq!(resolved.origin, Origin::Cache);
    assert_eq!(server.requests(), requests);
}

#[test]
fn resolving_locally_when_offline_is_the_usual_not_found() {
    let cache = tempfile::tempdir().unwrap();
    let offline = HubConfig { offline: true, ..config(cache.path(), "http://127.0.0.1:9") };
    let err = sdpipe_hub::resolve_local(&offline, REPO, "main", WANTS).unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err}");
}

/// Records what a download reported, and stops once `stop_after` files have started.
#[derive(Default)]
struct Recorder {
    started: std::sync::Mutex<Vec<(String, u64)>>,
    bytes: std::sync::atomic::AtomicU64,
    stop_after: Option<usize>,
}

impl sdpipe_hub::Observer for Recorder {
    fn started(&self, file: &str, bytes: u64) {
        self.started.lock().unwrap().push((file.to_string(), bytes));
    }
    fn advanced(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, std::sync::atomic::Ordering::SeqCst);
    }
    fn should_stop(&self) -> bool {
        self.stop_after.is_some_and(|n| self.started.lock().unwrap().len() >= n)
    }
}

#[test]
fn a_download_reports_each_file_with_its_size_and_every_byte() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let recorder = Recorder::default();
    let config = config(cache.path(), &server.endpoint());
    sdpipe_hub::resolve_observed(&config, REPO, "main", WANTS, &recorder).unwrap();
    let started = recorder.started.lock().unwrap().clone();
    let size = |name: &str| fs::metadata(model.path().join(name)).unwrap().len();
    assert_eq!(
        started,
        vec![
            ("config.json".to_string(), size("config.json")),
            ("model.safetensors".to_string(), size("model.safetensors")),
        ]
    );
    let total = size("config.json") + size("model.safetensors");
    assert_eq!(recorder.bytes.load(std::sync::atomic::Ordering::SeqCst), total);
}

#[test]
fn a_stopped_download_is_an_error_and_the_next_resolution_completes_it() {
    let model = model_folder();
    let server = HubServer::serve(REPO, model.path()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let config = config(cache.path(), &server.endpoint());
    let stopping = Recorder { stop_after: Some(1), ..Recorder::default() };
    let err = sdpipe_hub::resolve_observed(&config, REPO, "main", WANTS, &stopping).unwrap_err();
    assert!(matches!(err, HubError::Cancelled { .. }), "{err}");
    assert!(err.to_string().contains("resumes"), "{err}");

    let resolved = resolve_with(&config, REPO, "main", WANTS).unwrap();
    for name in ["config.json", "model.safetensors"] {
        let got = fs::read(resolved.file(name).unwrap()).unwrap();
        assert_eq!(got, fs::read(model.path().join(name)).unwrap(), "{name}");
    }
}
