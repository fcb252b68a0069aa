//! Seeded standard-normal noise for initial latents.
//!
//! ChaCha8 (value-stable across platforms and crate versions) feeding the Box–Muller
//! transform in f64, rounded to f32. This is *not* the stream `torch.randn` draws for the same
//! seed — PyTorch's Philox/MT generators are not reproduced — so a seed here and a seed in
//! diffusers give different images; what a seed does guarantee is that the same seed gives
//! the same latents on every machine, one image at a time or in any batch.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` independent N(0, 1) values from `seed`.
pub fn standard_normal(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // A uniform in (0, 1]: 53 random bits, never 0 so the logarithm is finite.
    let mut uniform = move || ((rng.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_noise() {
        assert_eq!(standard_normal(7, 33), standard_normal(7, 33));
        assert_ne!(standard_normal(7, 33), standard_normal(8, 33));
    }

    #[test]
    fn noise_has_zero_mean_and_unit_variance() {
        let x = standard_normal(1, 100_000);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }
}
