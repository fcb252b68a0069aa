//! Deterministic random weights: a closed-form recipe that gives every tensor of a network a
//! value from its name, its shape and a seed.
//!
//! The published metric networks cannot be downloaded here, and even random Inception weights
//! (~95 MB) are too big to commit as a fixture. So the parity script (`tests/parity/metrics.py`)
//! and this module compute the *same* random weights from the same recipe, bit for bit, and the
//! fixtures hold only images and reference outputs. The `random` weights value of the `fid` and
//! `lpips` stages uses the recipe too, for offline demos.
//!
//! Recipe, per tensor named `name` with `n` elements, for element `i` (0-based):
//! `key = fnv1a64(name) ^ mix(seed + φ)`, `z = mix(key + (i + 1)·φ)` (wrapping u64 arithmetic,
//! `mix` = the splitmix64 finaliser, `φ = 0x9E3779B97F4A7C15`), and
//! `u = (z >> 40)·2⁻²³ − 1`, a uniform value in [-1, 1) that is exact in f32. The value is then
//! `u` scaled by the tensor's role ([`Init`]) in f32 arithmetic, which both sides round alike.

/// What a tensor is for, which decides the range of its random values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Convolution kernel: He-uniform, `u·√(6/fan_in)`, so activations keep their scale through
    /// dozens of ReLU layers and the features stay well away from zero and overflow.
    Conv { fan_in: usize },
    /// BatchNorm scale γ = 1 + u/4.
    BnWeight,
    /// BatchNorm shift β = u/10.
    BnBias,
    /// BatchNorm running mean = u/10.
    BnMean,
    /// BatchNorm running variance = 1 + u/2 (always positive).
    BnVar,
    /// Convolution bias = u/10.
    Bias,
    /// LPIPS linear layer weight = (u + 1)·0.05, non-negative like the trained ones.
    Lin,
}

const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finaliser: a bijective mix of all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bit: a stable hash of the tensor name (Rust's `Hash` is not stable across builds).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// `n` uniform values in [-1, 1) for the tensor `name`.
pub fn uniform(name: &str, seed: u64, n: usize) -> Vec<f32> {
    let key = fnv1a64(name.as_bytes()) ^ mix(seed.wrapping_add(PHI));
    let mut out = Vec::with_capacity(n);
    let mut counter = key;
    for _ in 0..n {
        counter = counter.wrapping_add(PHI);
        let z = mix(counter);
        out.push((z >> 40) as f32 * (1.0 / 8_388_608.0) - 1.0);
    }
    out
}

/// The values of one tensor under the recipe.
pub fn values(name: &str, n: usize, init: Init, seed: u64) -> Vec<f32> {
    let mut v = uniform(name, seed, n);
    match init {
        Init::Conv { fan_in } => {
            let a = (6.0f64 / fan_in as f64).sqrt() as f32;
            v.iter_mut().for_each(|x| *x *= a);
        }
        Init::BnWeight => v.iter_mut().for_each(|x| *x = 1.0 + 0.25 * *x),
        Init::BnBias | Init::BnMean | Init::Bias => v.iter_mut().for_each(|x| *x *= 0.1),
        Init::BnVar => v.iter_mut().for_each(|x| *x = 1.0 + 0.5 * *x),
        Init::Lin => v.iter_mut().for_each(|x| *x = (*x + 1.0) * 0.05),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_values_lie_in_the_half_open_unit_interval_and_vary() {
        let v = uniform("Mixed_5b.branch1x1.conv.weight", 0, 10_000);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert_ne!(v[0], v[1]);
    }

    #[test]
    fn names_and_seeds_give_independent_streams() {
        let a = uniform("a.weight", 0, 8);
        assert_ne!(a, uniform("b.weight", 0, 8));
        assert_ne!(a, uniform("a.weight", 1, 8));
        assert_eq!(a, uniform("a.weight", 0, 8));
    }

    #[test]
    fn recipe_matches_the_values_the_parity_script_computes() {
        // The numpy implementation in tests/parity/metrics.py (`uniform`) gives these for
        // "features.0.weight", seed 0 (the whole networks are compared through the fixtures).
        let expected: [f32; 3] = [0.967_182_64, 0.466_314_08, -0.348_653_32];
        assert_eq!(uniform("features.0.weight", 0, 3), expected);
    }
}
