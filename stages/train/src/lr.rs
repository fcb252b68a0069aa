//! Learning-rate schedules: the multipliers of diffusers' `get_scheduler`, per optimiser step.
//!
//! diffusers wraps each schedule in torch's `LambdaLR`, which evaluates the multiplier at the
//! number of scheduler steps taken so far. The training loop steps the scheduler right after each
//! optimiser step, so optimiser step `k` (counted from 1) runs with `lr · factor(k − 1)`: with
//! warmup, the very first update uses a learning rate of zero, exactly as the reference does.

use std::f64::consts::PI;

/// A schedule by its diffusers name (the `lr_scheduler` parameter's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl LrKind {
    /// The names accepted by the `lr_scheduler` parameter (diffusers' spelling).
    pub const NAMES: &'static [&'static str] =
        &["constant", "constant_with_warmup", "linear", "cosine"];

    pub fn parse(name: &str) -> Option<LrKind> {
        Some(match name {
            "constant" => LrKind::Constant,
            "constant_with_warmup" => LrKind::ConstantWithWarmup,
            "linear" => LrKind::Linear,
            "cosine" => LrKind::Cosine,
            _ => return None,
        })
    }
}

/// A schedule with its warmup and horizon, as `get_scheduler(name, num_warmup_steps,
/// num_training_steps)` builds it (cosine with diffusers' default half cycle).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: LrKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub training_steps: u64,
}

impl LrSchedule {
    /// The multiplier after `scheduler_steps` scheduler steps (LambdaLR's `last_epoch`).
    pub fn factor(&self, scheduler_steps: u64) -> f64 {
        let step = scheduler_steps as f64;
        let warmup = self.warmup_steps as f64;
        let total = self.training_steps as f64;
        let in_warmup = scheduler_steps < self.warmup_steps;
        let warmup_ramp = step / warmup.max(1.0);
        match self.kind {
            // `constant` ignores the warmup entirely, as diffusers does.
            LrKind::Constant => 1.0,
            LrKind::ConstantWithWarmup if in_warmup => warmup_ramp,
            LrKind::ConstantWithWarmup => 1.0,
            LrKind::Linear if in_warmup => warmup_ramp,
            LrKind::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            LrKind::Cosine if in_warmup => warmup_ramp,
            LrKind::Cosine => {
                let progress = (step - warmup) / (total - warmup).max(1.0);
                // num_cycles = 0.5: half a cosine from 1 down to 0 over the decay.
                (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate the optimiser uses on optimiser step `step` (counted from 1).
    pub fn lr_at_optimizer_step(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: LrKind, warmup: u64, total: u64) -> LrSchedule {
        LrSchedule { kind, base_lr: 1e-4, warmup_steps: warmup, training_steps: total }
    }

    #[test]
    fn constant_is_the_base_rate_from_the_first_step_even_with_warmup() {
        let s = schedule(LrKind::Constant, 10, 100);
        assert_eq!(s.lr_at_optimizer_step(1), 1e-4);
        assert_eq!(s.lr_at_optimizer_step(100), 1e-4);
    }

    #[test]
    fn warmup_starts_at_zero_and_reaches_the_base_rate_after_warmup_steps() {
        let s = schedule(LrKind::ConstantWithWarmup, 4, 100);
        let factors: Vec<f64> = (1..=6).map(|k| s.lr_at_optimizer_step(k) / 1e-4).collect();
        assert_eq!(factors, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    #[test]
    fn linear_decays_to_zero_at_the_last_scheduler_step() {
        let s = schedule(LrKind::Linear, 2, 10);
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(1), 0.5);
        assert_eq!(s.factor(2), 1.0);
        assert!((s.factor(6) - 0.5).abs() < 1e-15);
        assert_eq!(s.factor(10), 0.0);
        assert_eq!(s.factor(12), 0.0, "never negative past the horizon");
    }

    #[test]
    fn cosine_follows_half_a_cosine_after_warmup() {
        let s = schedule(LrKind::Cosine, 0, 100);
        assert_eq!(s.factor(0), 1.0);
        assert!((s.factor(50) - 0.5).abs() < 1e-12);
        assert!((s.factor(25) - 0.5 * (1.0 + (PI * 0.25).cos())).abs() < 1e-12);
        assert!(s.factor(100).abs() < 1e-12);
    }

    #[test]
    fn names_parse_to_their_kinds_and_unknown_names_do_not() {
        for name in LrKind::NAMES {
            assert!(LrKind::parse(name).is_some(), "{name}");
        }
        assert_eq!(LrKind::parse("polynomial"), None);
    }
}
