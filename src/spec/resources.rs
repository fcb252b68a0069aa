//! Where a stage runs (`executor:`) and what it asks a cluster for (`resources:`), with the
//! checks on their values. Neither is part of a stage's key: the same stage gives the same
//! outputs on this machine and on a cluster node, so a result computed one way is reused the
//! other way.

use serde::{Deserialize, Serialize};

/// Which executor runs a stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorChoice {
    /// On this machine, in the scheduler's thread budget.
    #[default]
    Local,
    /// As a Slurm batch job (`sbatch`), on a node that shares the cache directory.
    Slurm,
}

impl ExecutorChoice {
    pub const NAMES: &'static [&'static str] = &["local", "slurm"];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "local" => Some(ExecutorChoice::Local),
            "slurm" => Some(ExecutorChoice::Slurm),
            _ => None,
        }
    }

    /// Whether the stage's work happens off this machine (it then holds no local thread slots).
    pub fn is_remote(self) -> bool {
        self != ExecutorChoice::Local
    }
}

/// What a stage asks a cluster scheduler for. Every field is optional; a stage's own
/// `resources:` override the pipeline's field by field. Ignored by the local executor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPUs for the stage (`--cpus-per-task`); the stage is granted this many threads.
    pub cpus: Option<u32>,
    /// GPUs (`--gres=gpu:N`).
    pub gpus: Option<u32>,
    /// Memory per node in Slurm's notation (`--mem`): `16G`, `500M`, or megabytes.
    pub mem: Option<String>,
    /// Wall-clock limit in Slurm's notation (`--time`): `90`, `1:30:00`, `2-00:00:00`.
    pub time: Option<String>,
    /// Partition (`--partition`).
    pub partition: Option<String>,
}

/// The keys of `resources:`.
pub const RESOURCE_KEYS: &[&str] = &["cpus", "gpus", "mem", "time", "partition"];

impl Resources {
    /// `self` with every field `over` sets replaced by its value.
    pub fn overlaid(&self, over: &Resources) -> Resources {
        Resources {
            cpus: over.cpus.or(self.cpus),
            gpus: over.gpus.or(self.gpus),
            mem: over.mem.clone().or_else(|| self.mem.clone()),
            time: over.time.clone().or_else(|| self.time.clone()),
            partition: over.partition.clone().or_else(|| self.partition.clone()),
        }
    }
}

/// Check a memory amount: digits with an optional unit `K`, `M`, `G` or `T` (Slurm's `--mem`).
/// Integers are megabytes, as in Slurm.
pub fn check_mem(text: &str) -> Result<String, String> {
    let t = text.trim();
    let digits = t.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    let unit_len = t.len() - digits.len();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || unit_len > 1 {
        return Err(format!(
            "`{text}` is not a memory amount: write a number with an optional unit K, M, G or T \
             (`16G`, `500M`; a bare number is megabytes)"
        ));
    }
    if digits.parse::<u64>().map_or(true, |n| n == 0) {
        return Err(format!("`{text}`: the memory amount must be positive"));
    }
    Ok(t.to_ascii_uppercase())
}

/// Check a time limit in one of Slurm's formats: `minutes`, `minutes:seconds`,
/// `hours:minutes:seconds`, `days-hours`, `days-hours:minutes`, `days-hours:minutes:seconds`.
pub fn check_time(text: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "`{text}` is not a Slurm time limit: write minutes (`90`), `hh:mm:ss` (`1:30:00`) or \
             `days-hh:mm:ss` (`2-00:00:00`)"
        )
    };
    let t = text.trim();
    let numbers = |s: &str| -> Option<Vec<u64>> {
        s.split(':')
            .map(|n| (!n.is_empty() && n.len() <= 6).then(|| n.parse::<u64>().ok()).flatten())
            .collect()
    };
    let (days, rest) = match t.split_once('-') {
        Some((d, rest)) => (Some(d), rest),
        None => (None, t),
    };
    if let Some(d) = days {
        if d.is_empty() || d.len() > 4 || !d.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
    }
    let parts = numbers(rest).ok_or_else(bad)?;
    if !(1..=3).contains(&parts.len()) {
        return Err(bad());
    }
    // After the first field, minutes and seconds are below 60.
    if parts.iter().skip(1).any(|&n| n >= 60) {
        return Err(bad());
    }
    let total: u64 = parts.iter().sum::<u64>() + days.map_or(0, |d| d.parse().unwrap_or(0));
    if total == 0 {
        return Err(format!("`{text}`: the time limit must be positive"));
    }
    Ok(t.to_string())
}

/// Check a partition name: letters, digits, `_`, `-` and `.` (one word, as `sbatch` takes it).
pub fn check_partition(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if ok {
        Ok(text.to_string())
    } else {
        Err(format!(
            "`{text}` is not a partition name: use letters, digits, `_`, `-` and `.`, at most 64"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_amounts_take_slurm_units_and_refuse_the_rest() {
        assert_eq!(check_mem("16G").unwrap(), "16G");
        assert_eq!(check_mem("500m").unwrap(), "500M");
        assert_eq!(check_mem("2048").unwrap(), "2048");
        for bad in ["", "G", "16GB", "1.5G", "-1G", "0", "16 G x"] {
            assert!(check_mem(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn time_limits_take_each_slurm_format() {
        for good in ["90", "30:00", "1:30:00", "2-0", "2-12:00", "2-12:00:00"] {
            assert_eq!(check_time(good).unwrap(), good);
        }
        for bad in ["", "0", "1:60", "1h", "a-1", "1:2:3:4", "-5", "1--2", "1:"] {
            assert!(check_time(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn partition_names_are_single_words() {
        assert!(check_partition("gpu-a100").is_ok());
        assert!(check_partition("gpu a100").is_err());
        assert!(check_partition("gpu;rm").is_err());
        assert!(check_partition("").is_err());
    }

    #[test]
    fn stage_resources_override_the_pipeline_field_by_field() {
        let pipeline =
            Resources { cpus: Some(4), partition: Some("cpu".into()), ..Default::default() };
        let stage = Resources { cpus: Some(8), gpus: Some(1), ..Default::default() };
        let merged = pipeline.overlaid(&stage);
        assert_eq!(merged.cpus, Some(8));
        assert_eq!(merged.gpus, Some(1));
        assert_eq!(merged.partition.as_deref(), Some("cpu"));
    }
}
