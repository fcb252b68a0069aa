//! Running a pipeline: stages start as soon as their inputs are done, in parallel within the
//! thread budget; each stage is looked up by key, computed on a miss, and committed atomically
//! (objects first, index record last). Also `status`, the same walk without executing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sdpipe_stages::api::{CancelToken, Fetch, OutputKind};

use crate::cache::{Cache, ObjectStore, OutputRecord, Record};
use crate::dag::Dag;
use crate::events::{Event, Reporter};
use crate::executor::{ExecError, Executor, Job};
use crate::fingerprint::{self, Fingerprint, FingerprintError};
use crate::freshness::{self, Freshness, Mode};
use crate::hash;
use crate::key::Reason;
use crate::materialize;
use crate::project::Project;
use crate::remote::{Pushed, Remote, RemoteError};
use crate::spec::{Action, Pipeline, Stage};
use crate::summary::{ReasonOut, RemoteState, StageSummary, State, Summary, SUMMARY_SCHEMA};
use crate::ui::Ui;

pub struct RunOptions {
    /// Thread budget: at most this many threads' worth of stages run at once.
    pub jobs: usize,
    /// Stages to run regardless of the cache.
    pub force: HashSet<String>,
    /// Run only these stages and what they need (all when empty).
    pub targets: Vec<String>,
    /// Suppress progress lines (for `--json`).
    pub quiet: bool,
}

pub struct Engine<'a> {
    pub pipeline: &'a Pipeline,
    pub project: &'a Project,
    pub cache: &'a Cache,
    pub executor: &'a dyn Executor,
    pub cancel: CancelToken,
    /// The shared remote cache: pulled from on a local miss, pushed to after a stage runs.
    pub remote: Option<&'a Remote>,
}

/// How one stage ended, before it becomes a [`StageSummary`].
struct Finished {
    summary: StageSummary,
    record: Option<Record>,
}

/// What [`Scheduler::find_result`] found for a stage's key before anything runs.
struct Found {
    /// The result to reuse, if any.
    record: Option<Record>,
    /// Why the stage must run (empty when a result was found).
    reasons: Vec<Reason>,
    /// Whether another process held the key and this one waited for it.
    waited: bool,
    /// Whether the result came from the local cache (one pulled from the remote is not yet in
    /// its history).
    found_locally: bool,
    /// What the remote said, when it was asked.
    remote_state: Option<RemoteState>,
    /// Held while this process computes the key.
    key_lock: Option<crate::lock::FileLock>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Engine<'_> {
    fn selected(&self, targets: &[String]) -> Vec<String> {
        if targets.is_empty() {
            self.pipeline.stages.keys().cloned().collect()
        } else {
            self.pipeline.with_upstream(targets)
        }
    }

    /// The records of every stage `name` (transitively) depends on that has one.
    fn ancestor_records(
        &self,
        name: &str,
        records: &HashMap<String, Record>,
    ) -> HashMap<String, Record> {
        self.pipeline
            .with_upstream(&[name.to_string()])
            .into_iter()
            .filter(|s| s != name)
            .filter_map(|s| records.get(&s).map(|r| (s, r.clone())))
            .collect()
    }

    /// Execute the pipeline.
    pub fn run(&self, opts: &RunOptions) -> Summary {
        let started = Instant::now();
        let dag = Dag::build(self.pipeline);
        let selected: HashSet<String> = self.selected(&opts.targets).into_iter().collect();
        let order: Vec<String> =
            dag.topo_order().into_iter().filter(|s| selected.contains(s)).collect();
        let ui = Ui::new(order.len() as u64, opts.quiet);
        let jobs = opts.jobs.max(1);

        let mut done: HashMap<String, Finished> = HashMap::new();
        let mut records: HashMap<String, Record> = HashMap::new();
        let mut running: HashMap<String, usize> = HashMap::new();
        let mut pending: Vec<String> = order.clone();
        let (tx, rx) = mpsc::channel::<(String, Finished)>();

        std::thread::scope(|scope| {
            loop {
                // Settle stages whose upstream failed, then start whatever fits.
                let mut progressed = true;
                while progressed {
                    progressed = false;
                    let mut i = 0;
                    while i < pending.len() {
                        let name = pending[i].clone();
                        let stage = &self.pipeline.stages[&name];
                        let ups: Vec<&str> = stage.upstream().collect();
                        let blocked = ups.iter().find(|u| {
                            done.get(**u).is_some_and(|f| {
                                matches!(f.summary.state, State::Failed | State::Skipped)
                            })
                        });
                        if let Some(up) =
                            blocked.or(if self.cancel.is_cancelled() { Some(&"") } else { None })
                        {
                            let mut s =
                                StageSummary::new(&name, stage.action.kind_name(), State::Skipped);
                            s.error = Some(if up.is_empty() {
                                "run interrupted".to_string()
                            } else {
                                format!("upstream stage `{up}` did not succeed")
                            });
                            ui.skip_stage();
                            done.insert(name.clone(), Finished { summary: s, record: None });
                            pending.remove(i);
                            progressed = true;
                            continue;
                        }
                        let ready = ups.iter().all(|u| records.contains_key(*u));
                        let need = stage.threads.min(jobs);
                        // A stage running on a cluster holds no local thread slots.
                        let slots = if stage.executor.is_remote() { 0 } else { need };
                        let used: usize = running.values().sum();
                        if ready && (used + slots <= jobs || running.is_empty()) {
                            pending.remove(i);
                            running.insert(name.clone(), slots);
                            let upstream = self.ancestor_records(&name, &records);
                            let tx = tx.clone();
                            let force = opts.force.contains(&name);
                            let ui = &ui;
                            scope.spawn(move || {
                                let finished = self.run_stage(stage, &upstream, need, force, ui);
                                let _ = tx.send((stage.name.clone(), finished));
                            });
                            progressed = true;
                            continue;
                        }
                        i += 1;
                    }
                }
                if running.is_empty() {
                    break;
                }
                let (name, finished) = rx.recv().expect("workers always report");
                running.remove(&name);
                if let Some(r) = &finished.record {
                    records.insert(name.clone(), r.clone());
                }
                done.insert(name, finished);
            }
        });
        ui.finish();

        let stages: Vec<StageSummary> =
            order.iter().filter_map(|n| done.remove(n)).map(|f| f.summary).collect();
        let ok = stages.iter().all(|s| matches!(s.state, State::Ran | State::Cached));
        Summary {
            schema: SUMMARY_SCHEMA,
            command: "run",
            pipeline: self.project.pipeline_rel.clone(),
            ok,
            interrupted: self.cancel.is_cancelled(),
            duration_ms: started.elapsed().as_millis() as u64,
            stages,
        }
    }

    /// Look up, or compute and commit, one stage. Never panics the scheduler: every failure
    /// becomes a failed summary.
    fn run_stage(
        &self,
        stage: &Stage,
        upstream: &HashMap<String, Record>,
        threads: usize,
        force: bool,
        ui: &Ui,
    ) -> Finished {
        let kind = stage.action.kind_name();
        let fail = |key: Option<String>, error: String, log: Option<PathBuf>| {
            let mut s = StageSummary::new(&stage.name, kind, State::Failed);
            s.key = key;
            s.error = Some(error);
            s.log = log.map(|p| p.display().to_string());
            Finished { summary: s, record: None }
        };
        let identity = self.project.identity(&stage.name);
        let memo = self.cache.memo();
        // Resolving the stage's models may download them: the bar shows the bytes, and
        // Ctrl-C stops the download (the next run resumes it).
        let downloads = ui.download_bar(&stage.name);
        let fetch = Fetch::Allowed { progress: &downloads, cancel: &self.cancel };
        let fingerprinted = fingerprint::fingerprint(self.pipeline, stage, upstream, &memo, fetch);
        drop(downloads);
        let fp = match fingerprinted {
            Ok(fp) => fp,
            Err(e) => return fail(None, e.to_string(), None),
        };
        let key_hex = fp.key.to_hex();

        let found = match self.find_result(stage, &fp, &identity, force, ui) {
            Ok(found) => found,
            Err(message) => return fail(Some(key_hex), message, None),
        };
        // The key lock (when held) is released when this function returns, after the commit.
        let Found { record, reasons, waited, found_locally, mut remote_state, key_lock: _lock } =
            found;
        let file = self.pipeline.file.to_string_lossy();

        let (state, record, duration_ms) = match record {
            Some(record) => {
                // A record the local lookup found is in the history already; one from
                // elsewhere (the remote) is noted here.
                if !found_locally {
                    if let Err(e) = self.cache.with_index(|i| i.commit(&record, &identity, &file)) {
                        tracing::warn!("could not update history of {}: {e}", stage.name);
                    }
                }
                (State::Cached, record, None)
            }
            None => {
                ui.report(&Event::Started { stage: &stage.name, kind, reasons: &reasons });
                let bar = ui.stage_bar(&stage.name);
                let t0 = Instant::now();
                let result = self.execute(stage, &fp, upstream, threads, &bar, &identity);
                ui.finish_stage(bar);
                match result {
                    Ok(record) => (State::Ran, record, Some(t0.elapsed().as_millis() as u64)),
                    Err(failure) => {
                        ui.report(&Event::Failed { stage: &stage.name, error: &failure.message });
                        let mut f = fail(Some(key_hex), failure.message, failure.log);
                        f.summary.reasons = reasons.into_iter().map(ReasonOut::from).collect();
                        f.summary.duration_ms = Some(t0.elapsed().as_millis() as u64);
                        return f;
                    }
                }
            }
        };
        if state == State::Ran {
            if let Some(pushed) = self.push_result(stage, &record) {
                // A failed pull says more about the remote than the push that followed it.
                remote_state = Some(remote_state.unwrap_or(pushed));
            }
        }
        if state == State::Cached {
            ui.finish_stage(ui.stage_bar(&stage.name));
            let pulled = remote_state == Some(RemoteState::Pulled);
            ui.report(&Event::Reused { stage: &stage.name, pulled });
        } else {
            let seconds = duration_ms.unwrap_or(0) as f64 / 1000.0;
            ui.report(&Event::Ran { stage: &stage.name, seconds });
        }

        let mut summary = StageSummary::new(&stage.name, kind, state);
        summary.key = Some(key_hex);
        summary.reasons = reasons.into_iter().map(ReasonOut::from).collect();
        summary.duration_ms = duration_ms;
        summary.waited = waited;
        summary.remote = remote_state;
        self.materialise_result(stage, summary, record)
    }

    /// `summary` completed with the result's log and, materialised into the run directory, its
    /// outputs (and the headline file a person opens).
    fn materialise_result(
        &self,
        stage: &Stage,
        mut summary: StageSummary,
        record: Record,
    ) -> Finished {
        // The log of the run that produced this result.
        summary.log = record.log.map(|d| self.cache.store().path(&d).display().to_string());
        match self.materialize(stage, &record) {
            Ok(paths) => {
                summary.outputs = paths;
                if let Action::Builtin(kind) = &stage.action {
                    summary.headline = kind.headline().map(|rel| {
                        self.project.runs_dir.join(&stage.name).join(rel).display().to_string()
                    });
                }
            }
            Err(e) => {
                tracing::warn!("could not materialise {} into the run directory: {e}", stage.name)
            }
        }
        Finished { summary, record: Some(record) }
    }

    /// A result for the stage's key that needs no run: in the local cache (after waiting for
    /// another process computing the same key, if one is), else on the remote. When there is
    /// none, the returned key lock is held until this process has computed it. `Err` is the
    /// failure's message.
    fn find_result(
        &self,
        stage: &Stage,
        fp: &Fingerprint,
        identity: &str,
        force: bool,
        ui: &Ui,
    ) -> Result<Found, String> {
        let file = self.pipeline.file.to_string_lossy();
        let lookup = || -> Result<(Option<Record>, Vec<Reason>), String> {
            match freshness::decide(self.cache, identity, &file, fp, Mode::Run) {
                Ok(Freshness::Fresh(record)) => Ok((Some(record), Vec::new())),
                Ok(Freshness::Dirty(reasons)) => Ok((None, reasons)),
                Err(e) => Err(format!("cache index: {e}")),
            }
        };
        let (mut record, mut reasons) =
            if force { (None, vec![Reason::Forced]) } else { lookup()? };

        // Another process may be computing the same key: wait for it instead of duplicating work.
        let mut waited = false;
        let key_lock = if record.is_none() {
            let lock = self.cache.lock_key(&fp.key, |pid| {
                waited = true;
                let key = fp.key.short();
                ui.report(&Event::Waiting { stage: &stage.name, pid, key: &key });
            });
            Some(lock.map_err(|e| format!("cannot lock key: {e}"))?)
        } else {
            None
        };
        if waited && !force {
            (record, reasons) = lookup()?;
        }

        let found_locally = record.is_some();
        // A teammate's (or CI's) result for the same key is as good as our own.
        let mut remote = None;
        if let (None, false, Some(bucket)) = (&record, force, self.remote) {
            match bucket.pull(self.cache, &fp.key) {
                Ok(Some(pulled)) => {
                    record = Some(pulled);
                    reasons.clear();
                    remote = Some(RemoteState::Pulled);
                }
                Ok(None) => {}
                Err(e) => {
                    warn_remote(
                        &e,
                        &format!("could not pull `{}`; running it locally", stage.name),
                    );
                    remote = Some(RemoteState::PullFailed);
                }
            }
        }
        Ok(Found { record, reasons, waited, found_locally, remote_state: remote, key_lock })
    }

    /// Pushes a result this run computed to the remote, when there is a writable one; what
    /// became of it.
    fn push_result(&self, stage: &Stage, record: &Record) -> Option<RemoteState> {
        let remote = self.remote.filter(|r| !r.read_only())?;
        Some(match remote.push(self.cache, record) {
            Ok(Pushed::Uploaded { .. }) => RemoteState::Pushed,
            Ok(Pushed::AlreadyThere) => RemoteState::AlreadyOnRemote,
            Err(e) => {
                let what = format!("could not push `{}`; its local result is intact", stage.name);
                warn_remote(&e, &what);
                RemoteState::PushFailed
            }
        })
    }

    /// Run the stage in scratch and commit its outputs.
    fn execute(
        &self,
        stage: &Stage,
        fp: &Fingerprint,
        upstream: &HashMap<String, Record>,
        threads: usize,
        bar: &crate::ui::StageBar,
        identity: &str,
    ) -> Result<Record, Failure> {
        let log_path = self.cache.log_path(&fp.key);
        let plain = |e: String| Failure { message: e, log: None };
        let scratch = self
            .cache
            .scratch(&fp.key.short())
            .map_err(|e| plain(format!("cannot create scratch: {e}")))?;
        let out_dir = scratch.dir.join("out");
        let in_dir = scratch.dir.join("in");
        fs::create_dir_all(&out_dir).map_err(|e| plain(e.to_string()))?;

        // Inputs: read-only views of upstream outputs, private to this invocation.
        let mut inputs = BTreeMap::new();
        for (name, binding) in &stage.inputs {
            let output = &upstream[&binding.stage].outputs[&binding.output];
            let view = in_dir.join(name);
            materialize::place(self.cache.store(), output, &view)
                .map_err(|e| plain(format!("cannot prepare input `{name}`: {e}")))?;
            inputs.insert(name.clone(), view);
        }
        let state_dir = self.cache.state_dir(&fp.key);
        fs::create_dir_all(&state_dir).map_err(|e| plain(e.to_string()))?;
        let log =
            fs::File::create(&log_path).map_err(|e| plain(format!("cannot create log: {e}")))?;
        let with_log = |message: String| Failure {
            message: with_log_tail(&message, &log_path),
            log: Some(log_path.clone()),
        };

        let started_at = now_secs();
        let t0 = Instant::now();
        let job = Job {
            stage,
            vars: &self.pipeline.vars,
            params: &stage.params,
            inputs,
            provenance: fp.provenance.clone(),
            deps: fp.dep_paths.clone(),
            project_dir: &self.pipeline.dir,
            out_dir: out_dir.clone(),
            state_dir: state_dir.clone(),
            downloads_dir: self
                .cache
                .downloads_dir(stage.action.kind_name())
                .map_err(|e| plain(e.to_string()))?,
            log,
            threads,
            cancel: &self.cancel,
            progress: bar,
        };
        let views = view_stats(&in_dir);
        let result = self.executor.execute(job);
        // Input views are hardlinks of stored objects. Read-only bits do not stop root, so a
        // command that writes into an input damages the cached result of the stage upstream:
        // find it, evict the damaged objects, and refuse the stage's result.
        if view_stats(&in_dir) != views {
            if let Some(message) = self.evict_damaged_inputs(stage, upstream) {
                return Err(with_log(message));
            }
        }
        match result {
            Ok(()) => {}
            Err(ExecError::Cancelled) => return Err(with_log("interrupted".into())),
            Err(e) => return Err(with_log(e.to_string())),
        }
        if self.cancel.is_cancelled() {
            return Err(with_log("interrupted".into()));
        }
        let duration_ms = t0.elapsed().as_millis() as u64;

        // Dependencies were hashed before the stage ran; if one changed meanwhile the outputs
        // may belong to neither version, so nothing is recorded.
        let memo = self.cache.memo();
        for (name, dep) in &stage.deps {
            let now = hash::hash_path(&self.pipeline.dir, &dep.pattern, dep.is_glob, &memo)
                .map(|h| h.digest());
            if now.ok() != fp.manifest.deps.get(name).map(|d| d.digest) {
                return Err(with_log(format!(
                    "dependency `{}` changed while the stage ran; result not recorded (run again)",
                    dep.pattern
                )));
            }
        }

        let outputs = self.store_outputs(stage, &out_dir).map_err(&with_log)?;
        let store = self.cache.store();
        let manifest = store
            .put_bytes(&fp.manifest.canonical_bytes())
            .map_err(|e| with_log(format!("cannot store key manifest: {e}")))?;
        let log_digest = hash::hash_file(&log_path).ok();
        if let Some(d) = &log_digest {
            let copy = scratch.dir.join("log");
            if fs::copy(&log_path, &copy).is_ok() {
                let _ = store.put_file(&copy, d);
            }
        }
        let record = Record {
            key: fp.key,
            stage: stage.name.clone(),
            kind: stage.action.kind_name().to_string(),
            manifest,
            outputs,
            log: log_digest.filter(|d| store.contains(d)),
            started_at,
            duration_ms,
            threads,
            sdpipe_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        // The commit point: before this line nothing is recorded, after it the result is whole.
        // The result hint noted in the same session spares the next (no-op) run an index open.
        self.cache
            .with_index(|i| {
                i.commit(&record, identity, &self.pipeline.file.to_string_lossy())?;
                self.cache.note_result(i, identity, &record);
                Ok(())
            })
            .map_err(|e| with_log(format!("cannot record result: {e}")))?;
        let _ = fs::remove_file(&log_path);
        let _ = materialize::remove_tree(&state_dir);
        Ok(record)
    }

    /// Rehash the objects behind `stage`'s inputs; remove the damaged ones (so their stages
    /// recompute) and say which inputs were written to.
    fn evict_damaged_inputs(
        &self,
        stage: &Stage,
        upstream: &HashMap<String, Record>,
    ) -> Option<String> {
        let store = self.cache.store();
        let mut damaged = Vec::new();
        for (name, binding) in &stage.inputs {
            let output = &upstream[&binding.stage].outputs[&binding.output];
            let mut objects = vec![output.digest];
            if output.kind == OutputKind::Dir {
                if let Ok(tree) = materialize::load_tree(store, output) {
                    objects.extend(tree.entries.iter().map(|e| e.digest));
                }
            }
            let bad: Vec<_> = objects
                .into_iter()
                .filter(|d| !crate::cache::store::verify_object(store, d).unwrap_or(false))
                .collect();
            if !bad.is_empty() {
                for d in &bad {
                    let _ = store.remove(d);
                }
                damaged.push(format!("`{name}` (from {binding})"));
            }
        }
        (!damaged.is_empty()).then(|| {
            format!(
                "the command wrote into its input {}: inputs are read-only views of cached \
                 results, so this damaged them; the damaged objects were removed and the \
                 upstream stage will recompute on the next run (write new files instead)",
                damaged.join(", ")
            )
        })
    }

    /// Hash each declared output and move its files into the object store.
    fn store_outputs(
        &self,
        stage: &Stage,
        out_dir: &std::path::Path,
    ) -> Result<BTreeMap<String, OutputRecord>, String> {
        let store = self.cache.store();
        let mut outputs = BTreeMap::new();
        for out in &stage.outputs {
            let path = out_dir.join(&out.path);
            let meta = fs::symlink_metadata(&path).map_err(|_| {
                format!("declared output `{}` ({}) was not produced", out.name, out.path)
            })?;
            let actual = if meta.is_dir() {
                OutputKind::Dir
            } else if meta.is_file() {
                OutputKind::File
            } else {
                return Err(format!(
                    "output `{}` ({}) is neither a file nor a directory",
                    out.name, out.path
                ));
            };
            if let Some(expected) = out.kind {
                if expected != actual {
                    return Err(format!(
                        "output `{}` should be a {expected:?} but is a {actual:?}",
                        out.name
                    ));
                }
            }
            let record = match actual {
                OutputKind::File => {
                    let digest = hash::hash_file(&path)
                        .map_err(|e| format!("hashing output `{}`: {e}", out.name))?;
                    store
                        .put_file(&path, &digest)
                        .map_err(|e| format!("storing output `{}`: {e}", out.name))?;
                    OutputRecord {
                        path: out.path.clone(),
                        kind: actual,
                        digest,
                        size: meta.len(),
                        files: 1,
                    }
                }
                OutputKind::Dir => {
                    let files = hash::walk_files(&path)
                        .map_err(|e| format!("output `{}`: {e}", out.name))?;
                    let tree = hash::hash_entries(&files)
                        .map_err(|e| format!("hashing output `{}`: {e}", out.name))?;
                    use rayon::prelude::*;
                    files
                        .par_iter()
                        .zip(tree.entries.par_iter())
                        .try_for_each(|(f, e)| {
                            debug_assert_eq!(f.rel, e.path);
                            store.put_file(&f.abs, &e.digest)
                        })
                        .map_err(|e| format!("storing output `{}`: {e}", out.name))?;
                    let digest = store
                        .put_bytes(&tree.to_bytes())
                        .map_err(|e| format!("storing output `{}`: {e}", out.name))?;
                    OutputRecord {
                        path: out.path.clone(),
                        kind: actual,
                        digest,
                        size: tree.total_size(),
                        files: tree.entries.len() as u64,
                    }
                }
            };
            outputs.insert(out.name.clone(), record);
        }
        Ok(outputs)
    }

    /// Place a stage's outputs in `runs/<pipeline>/<stage>/`.
    fn materialize(&self, stage: &Stage, record: &Record) -> io::Result<BTreeMap<String, String>> {
        let dir = self.project.runs_dir.join(&stage.name);
        let outputs: Vec<(String, &OutputRecord)> =
            record.outputs.values().map(|o| (o.path.clone(), o)).collect();
        materialize::replace_dir(self.cache.store(), &dir, &outputs)?;
        Ok(record
            .outputs
            .iter()
            .map(|(name, o)| (name.clone(), dir.join(&o.path).display().to_string()))
            .collect())
    }

    /// Per stage: cached, or will run and why. Executes nothing and writes only the stat memo.
    pub fn status(&self, targets: &[String]) -> Summary {
        let started = Instant::now();
        let dag = Dag::build(self.pipeline);
        let selected: HashSet<String> = self.selected(targets).into_iter().collect();
        let order: Vec<String> =
            dag.topo_order().into_iter().filter(|s| selected.contains(s)).collect();
        let memo = self.cache.memo();
        let mut records: HashMap<String, Record> = HashMap::new();
        let mut stages = Vec::new();
        for name in &order {
            let stage = &self.pipeline.stages[name];
            let mut s = StageSummary::new(name, stage.action.kind_name(), State::WillRun);
            let pending: Vec<&str> =
                stage.upstream().filter(|u| !records.contains_key(*u)).collect();
            if !pending.is_empty() {
                s.reasons = pending
                    .iter()
                    .map(|u| ReasonOut::from(Reason::UpstreamWillRun { stage: u.to_string() }))
                    .collect();
                stages.push(s);
                continue;
            }
            let upstream = self.ancestor_records(name, &records);
            // `status` only looks: a model a run would download is reported, not fetched.
            match fingerprint::fingerprint(self.pipeline, stage, &upstream, &memo, Fetch::LocalOnly)
            {
                Err(FingerprintError::NotLocal(detail)) => {
                    s.reasons = vec![ReasonOut::from(Reason::NotLocal { detail })];
                }
                Err(e) => s.error = Some(e.to_string()),
                Ok(fp) => {
                    s.key = Some(fp.key.to_hex());
                    let identity = self.project.identity(name);
                    let file = self.pipeline.file.to_string_lossy();
                    let found = freshness::decide(self.cache, &identity, &file, &fp, Mode::Look);
                    match found {
                        Ok(Freshness::Fresh(record)) => {
                            s.state = State::Cached;
                            let dir = self.project.runs_dir.join(name);
                            s.outputs = record
                                .outputs
                                .iter()
                                .map(|(n, o)| (n.clone(), dir.join(&o.path).display().to_string()))
                                .collect();
                            records.insert(name.clone(), record);
                        }
                        Ok(Freshness::Dirty(reasons)) => {
                            match self.remote.map(|r| r.fetch_record(&fp.key)) {
                                Some(Ok(Some(record))) => {
                                    s.state = State::Cached;
                                    s.remote = Some(RemoteState::Available);
                                    records.insert(name.clone(), record);
                                }
                                other => {
                                    if let Some(Err(e)) = other {
                                        warn_remote(&e, "remote results not shown");
                                    }
                                    s.reasons = reasons.into_iter().map(ReasonOut::from).collect()
                                }
                            }
                        }
                        Err(e) => s.error = Some(format!("cache index: {e}")),
                    }
                }
            }
            stages.push(s);
        }
        Summary {
            schema: SUMMARY_SCHEMA,
            command: "status",
            pipeline: self.project.pipeline_rel.clone(),
            ok: stages.iter().all(|s| s.error.is_none()),
            interrupted: false,
            duration_ms: started.elapsed().as_millis() as u64,
            stages,
        }
    }
}

/// (inode, size, mtime) of every file under an input directory: a write through a hardlink
/// changes the shared inode's size or mtime.
fn view_stats(dir: &std::path::Path) -> BTreeMap<PathBuf, (u64, u64, i128)> {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let m = e.path().symlink_metadata().ok()?;
            let mtime = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
            Some((e.path().to_path_buf(), (m.ino(), m.len(), mtime)))
        })
        .collect()
}

/// A remote cache problem is a warning, never a failure; repeats of one outage are quiet.
fn warn_remote(error: &RemoteError, consequence: &str) {
    if error.is_repeat() {
        tracing::debug!("{error}; {consequence}");
    } else {
        tracing::warn!("{error}; {consequence}");
    }
}

struct Failure {
    message: String,
    log: Option<PathBuf>,
}

/// The error plus the last lines of the stage's log, so the cause is visible without opening it.
fn with_log_tail(message: &str, log: &std::path::Path) -> String {
    let tail = read_tail(log, 4096).unwrap_or_default();
    let lines: Vec<&str> = tail.lines().rev().take(12).collect();
    if lines.is_empty() {
        return message.to_string();
    }
    let mut out = format!("{message}\n  last lines of the log:");
    for line in lines.into_iter().rev() {
        out.push_str("\n  | ");
        out.push_str(line);
    }
    out
}

fn read_tail(path: &std::path::Path, max: u64) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
