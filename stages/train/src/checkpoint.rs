//! Checkpoints of a run in the stage's state directory, written atomically, and finding the
//! latest one to resume from.
//!
//! A checkpoint is a folder `checkpoint-<step>/` holding the trained weights
//! (`weights.safetensors`, diffusers names), the EMA shadow (`ema.safetensors`), AdamW's moments
//! (`adam.safetensors`, `<name>.exp_avg` / `<name>.exp_avg_sq`) and `state.json` (the step,
//! per-parameter AdamW step counts, the EMA's update count and the log so far). The data
//! position and random state need no storage: both are functions of the step number (see
//! [`crate::rng`] and [`crate::data::plan`]); `state.json` records them for people.
//!
//! It is written under a temporary name and renamed into place, so an interruption leaves either
//! the previous checkpoint or the new one, never half of one; older checkpoints are then removed.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::grad_scaler::GradScaler;
use crate::optim::Moments;
use crate::trainer::{LogLine, Snapshot};

const PREFIX: &str = "checkpoint-";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: unusable checkpoint ({message}); delete it to start the stage over")]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Serialize, Deserialize)]
struct State {
    format: u32,
    step: u64,
    names: Vec<String>,
    adam_steps: Vec<Option<u64>>,
    ema_optimization_step: Option<u64>,
    /// fp16 loss scaling's state (absent without it, and in checkpoints from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scaler: Option<GradScaler>,
    /// For people reading the folder: where the data schedule stands.
    epoch: u64,
    log: Vec<LogLine>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io { path: path.to_path_buf(), message: e.to_string() }
}

fn candle(path: &Path) -> impl Fn(candle_core::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io { path: path.to_path_buf(), message: e.to_string() }
}

/// Writes `snapshot` as `dir/checkpoint-<step>/` and removes older checkpoints.
pub fn save(
    dir: &Path,
    names: &[String],
    snapshot: &Snapshot,
    epoch: u64,
) -> Result<PathBuf, CheckpointError> {
    let final_path = dir.join(format!("{PREFIX}{}", snapshot.step));
    let partial = dir.join(format!(".{PREFIX}{}.partial", snapshot.step));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io(&partial))?;

    let named = |tensors: &[Tensor]| -> HashMap<String, Tensor> {
        names.iter().cloned().zip(tensors.iter().cloned()).collect()
    };
    let weights = partial.join("weights.safetensors");
    candle_core::safetensors::save(&named(&snapshot.weights), &weights)
        .map_err(candle(&weights))?;
    let mut moments = HashMap::new();
    for (name, slot) in names.iter().zip(&snapshot.adam) {
        if let Some(m) = slot {
            moments.insert(format!("{name}.exp_avg"), m.exp_avg.clone());
            moments.insert(format!("{name}.exp_avg_sq"), m.exp_avg_sq.clone());
        }
    }
    let adam = partial.join("adam.safetensors");
    candle_core::safetensors::save(&moments, &adam).map_err(candle(&adam))?;
    if let Some((_, shadow)) = &snapshot.ema {
        let ema = partial.join("ema.safetensors");
        candle_core::safetensors::save(&named(shadow), &ema).map_err(candle(&ema))?;
    }
    let state = State {
        format: FORMAT,
        step: snapshot.step,
        names: names.to_vec(),
        adam_steps: snapshot.adam.iter().map(|m| m.as_ref().map(|m| m.step)).collect(),
        ema_optimization_step: snapshot.ema.as_ref().map(|(count, _)| *count),
        scaler: snapshot.scaler,
        epoch,
        log: snapshot.log.clone(),
    };
    let state_path = partial.join("state.json");
    let text = serde_json::to_string_pretty(&state).expect("state serialises");
    fs::write(&state_path, text).map_err(io(&state_path))?;

    if final_path.exists() {
        fs::remove_dir_all(&final_path).map_err(io(&final_path))?;
    }
    fs::rename(&partial, &final_path).map_err(io(&final_path))?;
    for (step, path) in list(dir)? {
        if step != snapshot.step {
            fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    Ok(final_path)
}

/// Complete checkpoints in `dir` by step.
fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else { continue };
        if let Ok(step) = step.parse::<u64>() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The latest checkpoint in `dir`, if any, loaded onto `device` and checked against `names`.
pub fn load_latest(
    dir: &Path,
    names: &[String],
    device: &Device,
) -> Result<Option<Snapshot>, CheckpointError> {
    let Some((_, path)) = list(dir)?.pop() else { return Ok(None) };
    let corrupt = |message: String| CheckpointError::Corrupt { path: path.clone(), message };
    let state_path = path.join("state.json");
    let text = fs::read_to_string(&state_path).map_err(|e| corrupt(e.to_string()))?;
    let state: State = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    if state.format != FORMAT {
        return Err(corrupt(format!("format {} (this sdpipe writes {FORMAT})", state.format)));
    }
    if state.names != names {
        return Err(corrupt("its parameters are not this model's".into()));
    }
    let read = |file: &str| -> Result<HashMap<String, Tensor>, CheckpointError> {
        candle_core::safetensors::load(path.join(file), device)
            .map_err(|e| corrupt(format!("{file}: {e}")))
    };
    let take = |map: &mut HashMap<String, Tensor>, key: &str, file: &str| {
        map.remove(key).ok_or_else(|| corrupt(format!("{file} lacks `{key}`")))
    };
    let mut weights_map = read("weights.safetensors")?;
    let weights = names
        .iter()
        .map(|n| take(&mut weights_map, n, "weights.safetensors"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut moments = read("adam.safetensors")?;
    let mut adam = Vec::with_capacity(names.len());
    for (name, step) in names.iter().zip(&state.adam_steps) {
        adam.push(match step {
            None => None,
            Some(step) => Some(Moments {
                step: *step,
                exp_avg: take(&mut moments, &format!("{name}.exp_avg"), "adam.safetensors")?,
                exp_avg_sq: take(&mut moments, &format!("{name}.exp_avg_sq"), "adam.safetensors")?,
            }),
        });
    }
    if adam.len() != names.len() {
        return Err(corrupt("AdamW state does not cover every parameter".into()));
    }
    let ema = match state.ema_optimization_step {
        None => None,
        Some(count) => {
            let mut shadow_map = read("ema.safetensors")?;
            let shadow = names
                .iter()
                .map(|n| take(&mut shadow_map, n, "ema.safetensors"))
                .collect::<Result<Vec<_>, _>>()?;
            Some((count, shadow))
        }
    };
    Ok(Some(Snapshot {
        step: state.step,
        weights,
        adam,
        ema,
        scaler: state.scaler,
        log: state.log,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(step: u64, value: f32) -> Snapshot {
        let t = |v: f32| Tensor::new(&[v, v], &Device::Cpu).unwrap();
        Snapshot {
            step,
            weights: vec![t(value), t(value + 1.0)],
            adam: vec![Some(Moments { step, exp_avg: t(0.1), exp_avg_sq: t(0.2) }), None],
            ema: Some((step, vec![t(9.0), t(8.0)])),
            scaler: Some(GradScaler { scale: 1024.0, growth_tracker: 5, skipped: 1 }),
            log: (1..=step)
                // Step times are not saved (as in train_log.jsonl): zero reads back as zero.
                // Step 1 overflowed: its norm is written as null and reads back as infinity.
                .map(|s| LogLine {
                    step: s,
                    loss: 0.5,
                    lr: 1e-4,
                    grad_norm: if s == 1 { f64::INFINITY } else { 1.0 },
                    skipped: s == 1,
                    seconds: 0.0,
                })
                .collect(),
        }
    }

    fn names() -> Vec<String> {
        vec!["a.weight".into(), "b.bias".into()]
    }

    fn first(t: &Tensor) -> f32 {
        t.to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn a_saved_checkpoint_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &names(), &snapshot(3, 1.5), 0).unwrap();
        let back = load_latest(dir.path(), &names(), &Device::Cpu).unwrap().unwrap();
        assert_eq!(back.step, 3);
        assert_eq!(first(&back.weights[1]), 2.5);
        assert_eq!(back.adam[0].as_ref().unwrap().step, 3);
        assert_eq!(first(&back.adam[0].as_ref().unwrap().exp_avg_sq), 0.2);
        assert!(back.adam[1].is_none());
        let (count, shadow) = back.ema.unwrap();
        assert_eq!((count, first(&shadow[0])), (3, 9.0));
        assert_eq!(back.scaler, snapshot(3, 1.5).scaler);
        assert_eq!(back.log, snapshot(3, 1.5).log);
    }

    #[test]
    fn only_the_latest_checkpoint_is_kept_and_loaded() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &names(), &snapshot(2, 0.0), 0).unwrap();
        save(dir.path(), &names(), &snapshot(4, 7.0), 0).unwrap();
        assert!(!dir.path().join("checkpoint-2").exists());
        let back = load_latest(dir.path(), &names(), &Device::Cpu).unwrap().unwrap();
        assert_eq!((back.step, first(&back.weights[0])), (4, 7.0));
    }

    #[test]
    fn an_empty_state_directory_has_no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_latest(dir.path(), &names(), &Device::Cpu).unwrap().is_none());
        assert!(load_latest(&dir.path().join("absent"), &names(), &Device::Cpu).unwrap().is_none());
    }

    #[test]
    fn a_partial_write_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &names(), &snapshot(2, 0.0), 0).unwrap();
        fs::create_dir(dir.path().join(".checkpoint-3.partial")).unwrap();
        let back = load_latest(dir.path(), &names(), &Device::Cpu).unwrap().unwrap();
        assert_eq!(back.step, 2);
    }

    #[test]
    fn a_checkpoint_of_another_model_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &names(), &snapshot(2, 0.0), 0).unwrap();
        let other = vec!["x".to_string(), "y".to_string()];
        let message = load_latest(dir.path(), &other, &Device::Cpu).unwrap_err().to_string();
        assert!(message.contains("checkpoint-2") && message.contains("delete"), "{message}");
    }
}
