//! Kernel Inception Distance as clean-fid computes it: the unbiased estimate of the squared MMD
//! with the cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³, averaged over random subsets of
//! size m = min(N_real, N_fake, max_subset_size); the spread over subsets is reported too (as
//! torch-fidelity does: population standard deviation).
//!
//! Per subset X (real) and Y (fake) of m rows each:
//! MMD² = (Σ_{i≠j} k(xᵢ,xⱼ) + Σ_{i≠j} k(yᵢ,yⱼ)) / (m(m−1)) − 2 Σ_{i,j} k(xᵢ,yⱼ) / m².
//! Unlike FID it is unbiased, so it stays meaningful at the tutorial's ten test images.
//!
//! Subsets are drawn without replacement with ChaCha8 seeded by `seed` (clean-fid uses numpy's
//! global RNG): when m equals both set sizes every subset is the whole set and the value is
//! independent of the RNG, which is what the parity fixtures check.

use faer::Mat;
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sets up to this size get their full kernel matrices computed once (32 MB each at 2048);
/// larger ones are evaluated per subset.
const FULL_KERNEL_MAX: usize = 2048;

/// The estimate and how it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Kid {
    pub mean: f64,
    pub std: f64,
    pub subsets: usize,
    pub subset_size: usize,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KidError {
    #[error("KID needs at least 2 images per set (subset size would be {0})")]
    TooFew(usize),
    #[error("KID needs at least one subset")]
    NoSubsets,
    #[error("feature dimensions differ: {0} vs {1}")]
    Dimensions(usize, usize),
}

/// The polynomial kernel applied to a block of inner products `a bᵀ`.
fn kernel_block(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    let d = a.ncols() as f64;
    let gram = a * b.transpose();
    Mat::from_fn(gram.nrows(), gram.ncols(), |i, j| {
        let t = gram[(i, j)] / d + 1.0;
        t * t * t
    })
}

fn rows(x: &Mat<f64>, idx: &[usize]) -> Mat<f64> {
    Mat::from_fn(idx.len(), x.ncols(), |i, j| x[(idx[i], j)])
}

/// `m` distinct indices of `0..n` (partial Fisher–Yates), unbiased.
fn choose(rng: &mut ChaCha8Rng, n: usize, m: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..m {
        let span = (n - i) as u64;
        // Rejection sampling: only accept draws below the largest multiple of `span`.
        let zone = u64::MAX - (u64::MAX % span);
        let r = loop {
            let v = rng.next_u64();
            if v < zone {
                break v % span;
            }
        };
        all.swap(i, i + r as usize);
    }
    all.truncate(m);
    all
}

/// The unbiased MMD² of one subset from its three kernel blocks (accessed by index).
fn mmd2(
    m: usize,
    kxx: impl Fn(usize, usize) -> f64,
    kyy: impl Fn(usize, usize) -> f64,
    kxy: impl Fn(usize, usize) -> f64,
) -> f64 {
    let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
    for i in 0..m {
        for j in 0..m {
            if i != j {
                sxx += kxx(i, j);
                syy += kyy(i, j);
            }
            sxy += kxy(i, j);
        }
    }
    let m = m as f64;
    (sxx + syy) / (m * (m - 1.0)) - 2.0 * sxy / (m * m)
}

/// KID between `real` and `fake` features (rows are images).
pub fn kid(
    real: &Mat<f64>,
    fake: &Mat<f64>,
    subsets: usize,
    max_subset_size: usize,
    seed: u64,
) -> Result<Kid, KidError> {
    if real.ncols() != fake.ncols() {
        return Err(KidError::Dimensions(real.ncols(), fake.ncols()));
    }
    if subsets == 0 {
        return Err(KidError::NoSubsets);
    }
    let m = real.nrows().min(fake.nrows()).min(max_subset_size);
    if m < 2 {
        return Err(KidError::TooFew(m));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let full = real.nrows().max(fake.nrows()) <= FULL_KERNEL_MAX;
    let (kxx, kyy, kxy) = if full {
        (kernel_block(real, real), kernel_block(fake, fake), kernel_block(real, fake))
    } else {
        (Mat::new(), Mat::new(), Mat::new())
    };
    let mut values = Vec::with_capacity(subsets);
    for _ in 0..subsets {
        let ix = choose(&mut rng, real.nrows(), m);
        let iy = choose(&mut rng, fake.nrows(), m);
        let v = if full {
            mmd2(
                m,
                |i, j| kxx[(ix[i], ix[j])],
                |i, j| kyy[(iy[i], iy[j])],
                |i, j| kxy[(ix[i], iy[j])],
            )
        } else {
            let (x, y) = (rows(real, &ix), rows(fake, &iy));
            let (bxx, byy, bxy) =
                (kernel_block(&x, &x), kernel_block(&y, &y), kernel_block(&x, &y));
            mmd2(m, |i, j| bxx[(i, j)], |i, j| byy[(i, j)], |i, j| bxy[(i, j)])
        };
        values.push(v);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
    Ok(Kid { mean, std, subsets, subset_size: m })
}

/// The unbiased MMD² of the given row subsets (for tests against reference values computed on
/// the same subsets).
pub fn mmd2_of_subsets(real: &Mat<f64>, fake: &Mat<f64>, ix: &[usize], iy: &[usize]) -> f64 {
    let (x, y) = (rows(real, ix), rows(fake, iy));
    let (bxx, byy, bxy) = (kernel_block(&x, &x), kernel_block(&y, &y), kernel_block(&x, &y));
    mmd2(ix.len(), |i, j| bxx[(i, j)], |i, j| byy[(i, j)], |i, j| bxy[(i, j)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(n: usize, d: usize, seed: u64, shift: f64) -> Mat<f64> {
        let v = crate::recipe::uniform("kid-features", seed, n * d);
        Mat::from_fn(n, d, |i, j| v[i * d + j] as f64 + shift)
    }

    #[test]
    fn subsets_are_distinct_indices_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut idx = choose(&mut rng, 50, 20);
        assert!(idx.iter().all(|&i| i < 50));
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), 20);
    }

    #[test]
    fn whole_set_subsets_give_the_same_value_whatever_the_seed() {
        let (a, b) = (features(8, 5, 1, 0.0), features(8, 5, 2, 0.3));
        let k1 = kid(&a, &b, 10, 1000, 1).unwrap();
        let k2 = kid(&a, &b, 10, 1000, 2).unwrap();
        assert!((k1.mean - k2.mean).abs() < 1e-12);
        assert!(k1.std < 1e-12);
        assert_eq!(k1.subset_size, 8);
    }

    #[test]
    fn the_full_kernel_and_per_subset_paths_agree() {
        let (a, b) = (features(30, 4, 3, 0.0), features(25, 4, 4, 0.1));
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (ix, iy) = (choose(&mut rng, 30, 10), choose(&mut rng, 25, 10));
        let direct = mmd2_of_subsets(&a, &b, &ix, &iy);
        let full = kernel_block(&a, &a);
        let fy = kernel_block(&b, &b);
        let fxy = kernel_block(&a, &b);
        let via_full = mmd2(
            10,
            |i, j| full[(ix[i], ix[j])],
            |i, j| fy[(iy[i], iy[j])],
            |i, j| fxy[(ix[i], iy[j])],
        );
        assert!((direct - via_full).abs() < 1e-12);
    }

    #[test]
    fn a_shifted_distribution_is_farther_than_a_resample_of_the_same() {
        let a = features(40, 6, 5, 0.0);
        let same = features(40, 6, 6, 0.0);
        let shifted = features(40, 6, 7, 0.5);
        let near = kid(&a, &same, 20, 20, 0).unwrap().mean;
        let far = kid(&a, &shifted, 20, 20, 0).unwrap().mean;
        assert!(far > near + 0.01, "near {near}, far {far}");
    }

    #[test]
    fn one_image_is_an_error() {
        let e = kid(&features(1, 3, 1, 0.0), &features(5, 3, 2, 0.0), 10, 100, 0).unwrap_err();
        assert_eq!(e, KidError::TooFew(1));
    }
}
