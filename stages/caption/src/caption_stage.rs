//! The `caption` stage kind: every image of a folder captioned by BLIP, written as
//! `captions.jsonl` (`{"id", "text"}` lines in id order) for the `imagefolder` stage.
//!
//! The model is resolved by `sdpipe-hub` (local folder, HF cache, hub download) and its files are
//! the stage's external dependencies, so new weights behind the same name rerun captioning.
//! Captions already made are appended to the stage's state directory as batches finish, so an
//! interrupted run of the same stage resumes where it stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sdpipe_hub::{HubConfig, ResolvedModel, Want};
use sdpipe_stages::api::{
    Fetch, OutputKind, OutputSpec, ParamSpec, Params, StageContext, StageError, StageKind,
};
use sdpipe_stages::params::{Input, KindParams};
use serde_json::{json, Value};

use crate::model::{Blip, Decoding, ModelFiles};
use crate::preprocess::load_rgb;

const CAPTIONS: &str = "captions.jsonl";
const PARTIAL: &str = "captions.partial.jsonl";
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];

const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const TOKENIZER: &str = "tokenizer.json";
/// What the stage reads from the model; the processor configs are optional (defaults apply).
const WANTS: &[Want<'static>] = &[
    Want::File(CONFIG),
    Want::File(WEIGHTS),
    Want::File(TOKENIZER),
    Want::Optional("preprocessor_config.json"),
    Want::Optional("processor_config.json"),
];

/// The `caption` kind. `hub` overrides the environment's hub settings (tests).
#[derive(Default)]
pub struct Caption {
    pub hub: Option<HubConfig>,
}

/// The parameters.
#[derive(KindParams)]
struct Settings {
    /// A folder of images (`<id>.jpg`, `.jpeg`, `.png`, `.webp`).
    #[param(input)]
    images: Input,
    #[param(flatten)]
    options: Options,
}

/// The parameters besides the images: all that `threads` and `external_deps` read, which run
/// before the stage does (when the input may not be named in the parameters yet).
#[derive(KindParams)]
struct Options {
    /// Hub repository id or local folder of a BLIP captioning model (safetensors).
    #[param(default = "Salesforce/blip-image-captioning-large")]
    model: String,
    /// Branch, tag or commit of a hub model.
    #[param(default = "main")]
    revision: String,
    /// Beam search (transformers' generate with num_beams) or greedy decoding.
    #[param(default = "beam", one_of = &["beam", "greedy"])]
    decoding: String,
    /// Beams for beam search.
    #[param(default = 3, min = 1, max = 16)]
    num_beams: usize,
    /// Longest caption in tokens, counting [DEC] and the prompt (as transformers).
    #[param(default = 20, min = 2, max = 512)]
    max_length: usize,
    /// The end token is forbidden until the sequence (with [DEC]) is this long.
    #[param(default = 5, min = 0, max = 512)]
    min_length: usize,
    /// Conditional captioning prefix, e.g. `a photography of` (empty: none).
    #[param(default = "")]
    prompt: String,
    /// Keep the prompt at the start of the caption (transformers' decode keeps it).
    #[param(default = false)]
    keep_prompt: bool,
    /// The text written, with {caption} replaced, e.g. `{caption}, in the style of X`.
    #[param(default = "{caption}")]
    template: String,
    /// Images per batch.
    #[param(default = 4, min = 1, max = 256)]
    batch_size: usize,
    /// CPU threads wanted.
    #[param(default = 4, min = 1, max = 256)]
    threads: usize,
}

impl Options {
    /// The decoding, after the checks the declared types cannot make: a usable `template`, and
    /// lengths and beams that agree.
    fn generation(&self) -> Result<Decoding, StageError> {
        let (max_length, min_length) = (self.max_length, self.min_length);
        check_template(&self.template)?;
        if min_length > max_length {
            return Err(StageError::InvalidParam {
                param: "min_length".into(),
                message: format!("{min_length} is above max_length ({max_length})"),
            });
        }
        if self.decoding == "beam" && self.num_beams < 2 {
            return Err(StageError::InvalidParam {
                param: "num_beams".into(),
                message: "beam search needs at least 2 beams; use `decoding: greedy`".into(),
            });
        }
        let num_beams = if self.decoding == "greedy" { 1 } else { self.num_beams };
        Ok(Decoding { num_beams, max_length, min_length })
    }
}

/// A template must use `{caption}` (else every image gets the same text) and nothing else.
fn check_template(template: &str) -> Result<(), StageError> {
    let invalid = |message: String| StageError::InvalidParam { param: "template".into(), message };
    let mut rest = template;
    let mut has_caption = false;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| invalid(format!("unclosed `{{` in `{template}`")))?;
        match &rest[open + 1..open + close] {
            "caption" => has_caption = true,
            other => {
                return Err(invalid(format!("unknown placeholder `{{{other}}}`; only {{caption}}")))
            }
        }
        rest = &rest[open + close + 1..];
    }
    if !has_caption {
        return Err(invalid(format!("`{template}` has no {{caption}}")));
    }
    Ok(())
}

impl Caption {
    fn hub_config(&self) -> HubConfig {
        self.hub.clone().unwrap_or_else(HubConfig::from_env)
    }

    fn resolve(
        &self,
        model: &str,
        revision: &str,
        fetch: Fetch,
    ) -> Result<ResolvedModel, StageError> {
        sdpipe_stages::model_fetch::resolve(&self.hub_config(), model, revision, WANTS, fetch)
            .map_err(|e| sdpipe_stages::model_fetch::stage_error(e, WEIGHTS))
    }
}

impl StageKind for Caption {
    fn name(&self) -> &'static str {
        "caption"
    }

    fn version(&self) -> u32 {
        1
    }

    fn doc(&self) -> &'static str {
        "Captions every image of a folder with BLIP (BlipForConditionalGeneration), as \
         transformers does it: RGB, Pillow bicubic resize to the model's square size, CLIP \
         normalisation; beam search (num_beams, max_length, min_length) or greedy decoding; \
         special tokens skipped. An optional `prompt` conditions the caption (BLIP's conditional \
         captioning; stripped from the text unless `keep_prompt`), and `template` wraps it (e.g. \
         `{caption}, in the style of X`). Writes `captions.jsonl` ({\"id\", \"text\"} lines in \
         id order, id = file stem). The model is a local folder or a hub repository id, \
         resolved through the HF cache; its files are part of the stage key."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Settings::specs()
    }

    fn outputs(&self) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "captions",
            path: CAPTIONS,
            kind: OutputKind::File,
            doc: "One {\"id\", \"text\"} line per image, in id order.",
        }]
    }

    fn threads(&self, params: &Params) -> usize {
        Options::of_params(params).map_or(4, |o| o.threads).max(1)
    }

    fn external_deps(
        &self,
        params: &Params,
        fetch: Fetch,
    ) -> Result<BTreeMap<String, PathBuf>, StageError> {
        let options = Options::of_params(params)?;
        let resolved = self.resolve(&options.model, &options.revision, fetch)?;
        Ok(resolved.files.into_iter().map(|(name, path)| (format!("model/{name}"), path)).collect())
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let Settings { images, options } = Settings::of(ctx)?;
        let decoding = options.generation()?;
        let images = list_images(images.path())?;
        let resolved = self.resolve(&options.model, &options.revision, Fetch::allowed())?;
        log(ctx, &format!("model: {}", resolved.describe()))?;
        let file = |name: &str| resolved.file(name).expect("required files are resolved");
        let files = ModelFiles {
            config: file(CONFIG),
            weights: file(WEIGHTS),
            tokenizer: file(TOKENIZER),
            root: &resolved.root,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(ctx.threads.max(1))
            .build()
            .map_err(|e| StageError::failed(format!("starting {} threads: {e}", ctx.threads)))?;
        pool.install(|| caption_all(ctx, &options, &decoding, &files, &images))
    }
}

fn log(ctx: &mut StageContext<'_>, line: &str) -> Result<(), StageError> {
    writeln!(ctx.log, "{line}").map_err(|e| StageError::io("writing the log", e))
}

/// `id → path` of every image in `dir`, sorted by id; other files are ignored.
fn list_images(dir: &Path) -> Result<BTreeMap<String, PathBuf>, StageError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StageError::io(format!("listing {}", dir.display()), e))?;
    let mut images = BTreeMap::new();
    for entry in entries {
        let path =
            entry.map_err(|e| StageError::io(format!("listing {}", dir.display()), e))?.path();
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
        let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        if stem.starts_with('.') || !ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
            continue;
        }
        if let Some(other) = images.insert(stem.clone(), path.clone()) {
            return Err(StageError::failed(format!(
                "two images have the id `{stem}`: {} and {}; ids (file stems) must be unique",
                other.display(),
                path.display()
            )));
        }
    }
    if images.is_empty() {
        return Err(StageError::failed(format!(
            "no images (.jpg, .jpeg, .png, .webp) in {}",
            dir.display()
        )));
    }
    Ok(images)
}

/// Captions already written by an interrupted run of this same stage (a torn last line is
/// dropped: it is redone).
fn read_partial(path: &Path) -> BTreeMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else { return BTreeMap::new() };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|v| Some((v["id"].as_str()?.to_string(), v["text"].as_str()?.to_string())))
        .collect()
}

fn caption_all(
    ctx: &mut StageContext<'_>,
    options: &Options,
    decoding: &Decoding,
    files: &ModelFiles<'_>,
    images: &BTreeMap<String, PathBuf>,
) -> Result<(), StageError> {
    let failed = StageError::caused;
    let device = ctx.candle_device()?;
    let model = Blip::load(files, &device).map_err(failed)?;
    let prompt = model.prompt_ids(&options.prompt).map_err(failed)?;

    let partial_path = ctx.state_dir.join(PARTIAL);
    let mut done = read_partial(&partial_path);
    done.retain(|id, _| images.contains_key(id));
    if !done.is_empty() {
        log(
            ctx,
            &format!("resuming: {} of {} images already captioned", done.len(), images.len()),
        )?;
    }
    let mut partial = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial_path)
        .map_err(|e| StageError::io(format!("opening {}", partial_path.display()), e))?;
    ctx.progress.set_total(images.len() as u64);
    ctx.progress.advance(done.len() as u64, "");

    let todo: Vec<(&String, &PathBuf)> =
        images.iter().filter(|(id, _)| !done.contains_key(*id)).collect();
    let started = Instant::now();
    for batch in todo.chunks(options.batch_size) {
        ctx.cancel.check()?;
        let mut pixels = Vec::with_capacity(batch.len());
        for (_, path) in batch {
            let (rgb, w, h) = load_rgb(path).map_err(failed)?;
            pixels.push(model.processor.pixels(&rgb, w, h));
        }
        let embeds = model.encode(&pixels).map_err(failed)?;
        let generated = model.generate(&embeds, &prompt, decoding).map_err(failed)?;
        let mut lines = String::new();
        let mut last = String::new();
        for ((id, _), tokens) in batch.iter().zip(generated) {
            let ids: Vec<u32> = if options.keep_prompt {
                prompt.iter().copied().chain(tokens).collect()
            } else {
                tokens
            };
            let caption = model.decode(&ids).map_err(failed)?;
            let text = options.template.replace("{caption}", caption.trim());
            lines.push_str(&json!({"id": id, "text": text}).to_string());
            lines.push('\n');
            done.insert(id.to_string(), text.clone());
            last = text;
        }
        partial
            .write_all(lines.as_bytes())
            .and_then(|_| partial.flush())
            .map_err(|e| StageError::io(format!("writing {}", partial_path.display()), e))?;
        ctx.progress.advance(batch.len() as u64, &last);
    }
    let seconds = started.elapsed().as_secs_f64();
    if !todo.is_empty() {
        log(
            ctx,
            &format!(
                "captioned {} images in {seconds:.1} s ({:.2} images/s, {} threads, batch {})",
                todo.len(),
                todo.len() as f64 / seconds,
                ctx.threads,
                options.batch_size
            ),
        )?;
    }

    let ids: BTreeSet<&String> = images.keys().collect();
    let mut out = String::new();
    for id in ids {
        let text = &done[id.as_str()];
        out.push_str(&json!({"id": id, "text": text}).to_string());
        out.push('\n');
    }
    let path = ctx.output_path(CAPTIONS);
    std::fs::write(&path, out).map_err(|e| StageError::io(format!("writing {CAPTIONS}"), e))
}
