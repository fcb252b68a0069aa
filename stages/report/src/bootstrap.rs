//! Percentile-bootstrap 95% intervals for the mean of a per-image metric, and the comparison of
//! two models on one.
//!
//! **Interval of a mean.** The mean of `n` per-image values is recomputed on [`RESAMPLES`]
//! resamples of `n` values drawn with replacement; the interval runs from the 2.5th to the
//! 97.5th percentile of those means (linear interpolation between order statistics, numpy's
//! default). B = 2000 because a percentile interval's endpoints sit in the tails: each tail
//! then holds 50 resampled means, which keeps the Monte-Carlo error of an endpoint to a few
//! percent of the interval's width (Efron & Tibshirani recommend B ≥ 1000 for percentile
//! intervals), while one interval of 1000 images still costs only milliseconds.
//!
//! **Comparing two models.** When both were evaluated on the same items (the same ids: same
//! prompts, same seeds), the comparison is *paired*: the items are resampled jointly and the
//! interval is of the mean per-item difference `b − a`, which removes the variation between
//! items that both models share; the difference is significant when that interval excludes 0.
//! When the items differ (any id in one set and not the other), they cannot be paired, and the
//! comparison falls back to the two models' own intervals: significant only when they do not
//! overlap. That test is conservative (two 95% intervals can overlap although the difference is
//! significant at 5%), so it errs towards "no significant difference".
//!
//! **Reproducibility.** Every resample is drawn from a ChaCha8 stream whose seed is an FNV-1a
//! hash of a fixed domain string and a label (see [`seed`]), passed through
//! `SeedableRng::seed_from_u64` (documented as value-stable). The labels are fixed too: every
//! interval uses [`interval_seed`] and every paired comparison [`paired_seed`], whatever the
//! metric or the models. So all of a report's resamples of `n` items draw the same indices
//! (common random numbers): identical values get identical intervals in any column and any
//! row, and a difference between two intervals is never Monte-Carlo noise. Names of metrics
//! or models in the seed would add nothing to reproducibility and would break that. Indices
//! are drawn without modulo bias: `next_u64()` values at or above the largest multiple of `n`
//! are rejected, and the accepted value is reduced `% n`. Nothing depends on a platform, a
//! thread count or a `rand` helper whose output may change between versions, so the same
//! inputs give the same intervals, byte for byte.
//!
//! The percentile bootstrap is approximate: with few items (below about 20) its intervals are
//! too narrow, and data without any spread (every item equal) gives a zero-width interval.

use std::collections::BTreeMap;

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Resamples per interval (see the module documentation for why 2000).
pub const RESAMPLES: usize = 2000;
/// The intervals' coverage.
pub const LEVEL: f64 = 0.95;
/// Mixed into every seed, so these streams share no draws with other seeded uses of ChaCha.
const DOMAIN: &str = "sdpipe report bootstrap v1";

/// Per-item values of one metric for one model, keyed by item id (the sample's id or file
/// stem), so two models' values can be paired by id.
pub type PerItem = BTreeMap<String, f64>;

/// An estimate with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// The mean of the values (for a paired comparison: the mean difference).
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
    /// How many values (items) it is computed from.
    pub n: usize,
}

impl Interval {
    /// The interval lies wholly above or wholly below zero.
    pub fn excludes_zero(&self) -> bool {
        self.low > 0.0 || self.high < 0.0
    }

    /// The two intervals share at least one point.
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.low <= other.high && other.low <= self.high
    }
}

/// A stream seed from `labels`: FNV-1a over
/// a fixed domain string and each label, labels separated by a byte that UTF-8 never contains.
pub fn seed(labels: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(DOMAIN.as_bytes());
    for label in labels {
        eat(&[0xff]);
        eat(label.as_bytes());
    }
    h
}

/// The seed of every interval of a mean (see the module documentation for why it is one).
pub fn interval_seed() -> u64 {
    seed(&["interval of a mean"])
}

/// The seed of every paired comparison.
pub fn paired_seed() -> u64 {
    seed(&["paired difference"])
}

/// An index uniform in `0..n` (`n` > 0), by rejection: no modulo bias.
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    let n = n as u64;
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let v = rng.next_u64();
        if v < zone {
            return (v % n) as usize;
        }
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The `p`-quantile of sorted values, interpolating linearly between order statistics.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * p;
    let (i, frac) = (h.floor() as usize, h - h.floor());
    match sorted.get(i + 1) {
        Some(next) if frac > 0.0 => sorted[i] + frac * (next - sorted[i]),
        _ => sorted[i],
    }
}

/// The [`LEVEL`] percentile-bootstrap interval of the mean of `values`, from [`RESAMPLES`]
/// resamples drawn from the stream `seed`. `None` for no values.
pub fn mean_interval(values: &[f64], seed: u64) -> Option<Interval> {
    mean_interval_with(values, seed, RESAMPLES)
}

/// [`mean_interval`] with `resamples` resamples (at least 1).
pub fn mean_interval_with(values: &[f64], seed: u64, resamples: usize) -> Option<Interval> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| values[below(&mut rng, n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - LEVEL) / 2.0;
    Some(Interval {
        estimate: mean(values),
        low: quantile(&means, tail),
        high: quantile(&means, 1.0 - tail),
        n,
    })
}

/// The interval of the mean per-item difference `b − a`, resampling items jointly; `None`
/// unless `a` and `b` hold exactly the same (non-empty) set of ids.
pub fn paired_difference(a: &PerItem, b: &PerItem, seed: u64) -> Option<Interval> {
    if a.len() != b.len() || !a.keys().eq(b.keys()) {
        return None;
    }
    let diffs: Vec<f64> = a.values().zip(b.values()).map(|(x, y)| y - x).collect();
    mean_interval(&diffs, seed)
}

/// One model's per-item values and the interval of their mean.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub values: &'a PerItem,
    pub interval: Interval,
}

/// How model `b` compares with model `a` on one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Comparison {
    /// Same items: the interval of the mean per-item difference `b − a`.
    Paired(Interval),
    /// Different items: the difference of the means, and the two models' own intervals.
    Unpaired { difference: f64, a: Interval, b: Interval },
}

impl Comparison {
    /// Paired when `a` and `b` have the same ids (the stream is `seed`), else unpaired.
    pub fn of(a: Sample<'_>, b: Sample<'_>, seed: u64) -> Comparison {
        match paired_difference(a.values, b.values, seed) {
            Some(d) => Comparison::Paired(d),
            None => Comparison::Unpaired {
                difference: b.interval.estimate - a.interval.estimate,
                a: a.interval,
                b: b.interval,
            },
        }
    }

    /// The same comparison seen from the other side (`a − b`). Exact: negating every
    /// difference negates every resampled mean, so the interval is the mirror image.
    pub fn flipped(&self) -> Comparison {
        match *self {
            Comparison::Paired(d) => Comparison::Paired(Interval {
                estimate: -d.estimate,
                low: -d.high,
                high: -d.low,
                n: d.n,
            }),
            Comparison::Unpaired { difference, a, b } => {
                Comparison::Unpaired { difference: -difference, a: b, b: a }
            }
        }
    }

    /// `b − a`.
    pub fn difference(&self) -> f64 {
        match self {
            Comparison::Paired(d) => d.estimate,
            Comparison::Unpaired { difference, .. } => *difference,
        }
    }

    /// The fewest items behind either side.
    pub fn n(&self) -> usize {
        match self {
            Comparison::Paired(d) => d.n,
            Comparison::Unpaired { a, b, .. } => a.n.min(b.n),
        }
    }

    /// Paired: the difference's interval excludes 0; unpaired: the intervals do not overlap.
    /// Never with fewer than two items, where resampling cannot show any spread.
    pub fn significant(&self) -> bool {
        self.n() >= 2
            && match self {
                Comparison::Paired(d) => d.excludes_zero(),
                Comparison::Unpaired { a, b, .. } => !a.overlaps(b),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic, spread-out values (a simple LCG, so the test needs no generator).
    fn spread(n: usize, offset: f64) -> Vec<f64> {
        let mut x: u64 = 12345;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                offset + (x >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    fn per_item(values: &[f64]) -> PerItem {
        values.iter().enumerate().map(|(i, v)| (format!("item-{i:04}"), *v)).collect()
    }

    #[test]
    fn the_interval_contains_the_mean() {
        let values = spread(50, 0.0);
        let i = mean_interval(&values, seed(&["lpips", "original"])).unwrap();
        assert!((i.estimate - mean(&values)).abs() < 1e-15);
        assert!(i.low < i.estimate && i.estimate < i.high, "{i:?}");
        assert_eq!(i.n, 50);
    }

    #[test]
    fn the_interval_shrinks_with_more_data() {
        let width = |n| {
            let i = mean_interval(&spread(n, 0.0), seed(&["x"])).unwrap();
            i.high - i.low
        };
        let (small, large) = (width(16), width(1024));
        // The width goes like 1/√n: 8 times narrower for 64 times the data.
        assert!(large < small / 4.0, "{small} vs {large}");
    }

    #[test]
    fn constant_data_gives_a_point() {
        let i = mean_interval(&[0.1; 7], seed(&["x"])).unwrap();
        assert_eq!((i.low, i.estimate, i.high), (i.estimate, i.estimate, i.estimate));
        assert!((i.estimate - 0.1).abs() < 1e-15);
        assert!(mean_interval(&[], 0).is_none());
    }

    #[test]
    fn the_same_seed_gives_the_same_interval_and_another_seed_another() {
        let values = spread(40, 0.0);
        let a = mean_interval(&values, seed(&["lpips", "original"])).unwrap();
        let b = mean_interval(&values, seed(&["lpips", "original"])).unwrap();
        assert_eq!(a, b);
        let c = mean_interval(&values, seed(&["lpips", "finetuned"])).unwrap();
        assert_ne!((a.low, a.high), (c.low, c.high));
    }

    #[test]
    fn seeds_are_value_stable() {
        // Pinned: a change here changes every report's intervals, so bump the kind's version.
        assert_eq!(seed(&[]), 0xabda_bbc8_ced3_8b2f, "{:#x}", seed(&[]));
        assert_ne!(seed(&["ab", "c"]), seed(&["a", "bc"]));
    }

    #[test]
    fn index_draws_are_uniform_enough() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[below(&mut rng, 3)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
    }

    #[test]
    fn a_paired_test_detects_a_clear_shift() {
        // The items vary a lot (0..1) but b is a, lowered by 0.05 on every item: only the
        // pairing sees that the shift is far outside the noise.
        let a = spread(16, 0.0);
        let b: Vec<f64> = a.iter().map(|v| v - 0.05 + 0.01 * (v - 0.5)).collect();
        let (a, b) = (per_item(&a), per_item(&b));
        let sample = |v: &PerItem, name| {
            let values: Vec<f64> = v.values().copied().collect();
            mean_interval(&values, seed(&["m", name])).unwrap()
        };
        let (ia, ib) = (sample(&a, "a"), sample(&b, "b"));
        assert!(ia.overlaps(&ib), "unpaired intervals alone would not tell");
        let c = Comparison::of(
            Sample { values: &a, interval: ia },
            Sample { values: &b, interval: ib },
            seed(&["m", "a", "b"]),
        );
        let Comparison::Paired(d) = c else { panic!("same ids pair: {c:?}") };
        assert!(d.high < 0.0 && d.low < -0.05 && d.high > -0.06, "{d:?}");
        assert!(c.significant());
    }

    #[test]
    fn a_paired_test_finds_no_difference_in_a_null_one() {
        // b differs from a by symmetric noise around zero.
        let a = spread(64, 0.0);
        let noise = spread(64, -0.5);
        let b: Vec<f64> = a.iter().zip(&noise).map(|(x, e)| x + 0.1 * e).collect();
        let d = paired_difference(&per_item(&a), &per_item(&b), seed(&["m"])).unwrap();
        assert!(d.low < 0.0 && d.high > 0.0, "{d:?}");
        let same = paired_difference(&per_item(&a), &per_item(&a), seed(&["m"])).unwrap();
        assert_eq!((same.low, same.high), (0.0, 0.0));
        assert!(!same.excludes_zero());
    }

    #[test]
    fn different_ids_fall_back_to_overlapping_intervals() {
        let a = per_item(&spread(20, 0.0));
        let mut b: PerItem = a.iter().map(|(k, v)| (format!("other-{k}"), v + 2.0)).collect();
        assert!(paired_difference(&a, &b, 0).is_none());
        let ia = mean_interval(&a.values().copied().collect::<Vec<_>>(), 1).unwrap();
        let ib = mean_interval(&b.values().copied().collect::<Vec<_>>(), 2).unwrap();
        let c = Comparison::of(
            Sample { values: &a, interval: ia },
            Sample { values: &b, interval: ib },
            3,
        );
        assert!(matches!(c, Comparison::Unpaired { .. }) && c.significant(), "{c:?}");
        assert!((c.difference() - 2.0).abs() < 1e-9);
        // Overlapping intervals: not significant.
        b = a.iter().map(|(k, v)| (format!("other-{k}"), v + 0.01)).collect();
        let ib = mean_interval(&b.values().copied().collect::<Vec<_>>(), 2).unwrap();
        let c = Comparison::of(
            Sample { values: &a, interval: ia },
            Sample { values: &b, interval: ib },
            3,
        );
        assert!(!c.significant(), "{c:?}");
    }

    #[test]
    fn one_item_is_never_significant() {
        let a = per_item(&[0.5]);
        let b = per_item(&[0.9]);
        let d = paired_difference(&a, &b, 0).unwrap();
        assert!(d.excludes_zero());
        assert!(!Comparison::Paired(d).significant());
    }
}
