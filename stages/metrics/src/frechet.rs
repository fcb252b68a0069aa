//! The Fréchet distance between Gaussians fitted to two feature sets, as pytorch-fid defines it:
//! `‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·tr √(Σ1Σ2)`, μ the mean and Σ the covariance (ddof 1), all in
//! f64.
//!
//! `tr √(Σ1Σ2)` has two exact evaluations, chosen by cost:
//! - [`Method::NuclearNorm`] (few images, the tutorial's case): with X̃ the centred N×d feature
//!   matrices, Σ1 = AAᵀ and Σ2 = BBᵀ for A = X̃1ᵀ/√(N1−1), B = X̃2ᵀ/√(N2−1). The non-zero
//!   eigenvalues of Σ1Σ2 = A(AᵀBBᵀ) are those of (AᵀB)(AᵀB)ᵀ, so tr √(Σ1Σ2) is the sum of the
//!   singular values of the N1×N2 matrix AᵀB = X̃1X̃2ᵀ/√((N1−1)(N2−1)): its nuclear norm. No
//!   d×d matrix is formed.
//! - [`Method::Covariance`] (many images): the symmetric formulation
//!   tr √(Σ1Σ2) = Σ √λᵢ(S Σ2 S) with S = Σ1^½ (eigendecomposition of Σ1, negative rounding-level
//!   eigenvalues clamped to 0). Σ1Σ2 = S·(SΣ2) and (SΣ2)·S = SΣ2S share their eigenvalues, which
//!   are real and ≥ 0 because SΣ2S is symmetric positive semi-definite; the trace of the
//!   principal square root is the sum of their square roots. scipy's `sqrtm` (which pytorch-fid
//!   calls) evaluates the same trace through a complex Schur form of the non-symmetric Σ1Σ2: on
//!   a singular product its triangular recurrence can divide by zero, hence pytorch-fid's retry
//!   with 1e-6·I added to both Σ; and rounding leaves imaginary parts, which pytorch-fid
//!   tolerates up to 1e-3 on the diagonal. The symmetric formulation never divides, so it needs
//!   no retry (non-finite features are rejected up front instead), and its only trace of
//!   "imaginary" rounding is a negative eigenvalue λ of SΣ2S: we fail the same way pytorch-fid
//!   does when √|λ| exceeds the same 1e-3.

use faer::{Mat, Side};

/// pytorch-fid's tolerance on imaginary components of √(Σ1Σ2).
const IMAGINARY_TOLERANCE: f64 = 1e-3;

/// How `tr √(Σ1Σ2)` was evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    NuclearNorm,
    Covariance,
}

impl Method {
    pub fn describe(self) -> &'static str {
        match self {
            Method::NuclearNorm => {
                "nuclear norm of the centred cross-feature matrix (exact, small N)"
            }
            Method::Covariance => "eigendecomposition of the covariances (exact, large N)",
        }
    }

    /// The cheaper exact method for these set sizes in dimension `d`: the cross matrix costs
    /// N1·N2·d to form, the covariances (N1+N2)·d² plus d³ eigensolves.
    pub fn cheapest(n1: usize, n2: usize, d: usize) -> Method {
        if (n1 as u128) * (n2 as u128) <= 4 * (d as u128) * (d as u128) {
            Method::NuclearNorm
        } else {
            Method::Covariance
        }
    }
}

/// Why the distance could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrechetError {
    #[error(
        "the {which} set has {n} image(s): a covariance needs at least 2 (FID compares \
         distributions; for single pairs use LPIPS)"
    )]
    TooFew { which: &'static str, n: usize },
    #[error("feature dimensions differ: {d1} vs {d2}")]
    Dimensions { d1: usize, d2: usize },
    #[error("the {which} features hold non-finite values (row {row}): broken weights or image?")]
    NotFinite { which: &'static str, row: usize },
    #[error(
        "√(Σ1Σ2) has an imaginary component of {0:.3e} (> 1e-3, pytorch-fid's limit): the \
         covariances are not positive semi-definite"
    )]
    Imaginary(f64),
    #[error("linear algebra failed: {0}")]
    LinearAlgebra(String),
}

/// The distance and its parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Frechet {
    pub fid: f64,
    /// ‖μ1 − μ2‖².
    pub mean_term: f64,
    pub trace1: f64,
    pub trace2: f64,
    /// tr √(Σ1Σ2).
    pub trace_sqrt: f64,
    pub method: Method,
}

/// Features as an f64 matrix, one row per image (`which` names the set in errors).
pub fn to_matrix(rows: &[Vec<f32>], which: &'static str) -> Result<Mat<f64>, FrechetError> {
    let d = rows.first().map_or(0, Vec::len);
    for (i, r) in rows.iter().enumerate() {
        if r.len() != d {
            return Err(FrechetError::Dimensions { d1: d, d2: r.len() });
        }
        if !r.iter().all(|x| x.is_finite()) {
            return Err(FrechetError::NotFinite { which, row: i });
        }
    }
    Ok(Mat::from_fn(rows.len(), d, |i, j| rows[i][j] as f64))
}

fn mean(x: &Mat<f64>) -> Vec<f64> {
    let n = x.nrows() as f64;
    (0..x.ncols()).map(|j| (0..x.nrows()).map(|i| x[(i, j)]).sum::<f64>() / n).collect()
}

fn centred(x: &Mat<f64>, mu: &[f64]) -> Mat<f64> {
    Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] - mu[j])
}

/// The Fréchet distance between the feature sets `x1` and `x2` (rows are images), by the
/// cheapest exact method.
pub fn frechet_distance(x1: &Mat<f64>, x2: &Mat<f64>) -> Result<Frechet, FrechetError> {
    frechet_distance_with(x1, x2, Method::cheapest(x1.nrows(), x2.nrows(), x1.ncols()))
}

/// The Fréchet distance by the given method (both are exact; tests compare them).
pub fn frechet_distance_with(
    x1: &Mat<f64>,
    x2: &Mat<f64>,
    method: Method,
) -> Result<Frechet, FrechetError> {
    for (which, x) in [("first", x1), ("second", x2)] {
        if x.nrows() < 2 {
            return Err(FrechetError::TooFew { which, n: x.nrows() });
        }
    }
    if x1.ncols() != x2.ncols() {
        return Err(FrechetError::Dimensions { d1: x1.ncols(), d2: x2.ncols() });
    }
    let (mu1, mu2) = (mean(x1), mean(x2));
    let (c1, c2) = (centred(x1, &mu1), centred(x2, &mu2));
    let (n1, n2) = ((x1.nrows() - 1) as f64, (x2.nrows() - 1) as f64);
    let mean_term: f64 = mu1.iter().zip(&mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let sum_sq = |c: &Mat<f64>| -> f64 {
        (0..c.ncols()).map(|j| (0..c.nrows()).map(|i| c[(i, j)] * c[(i, j)]).sum::<f64>()).sum()
    };
    let (trace1, trace2) = (sum_sq(&c1) / n1, sum_sq(&c2) / n2);
    let trace_sqrt = match method {
        Method::NuclearNorm => {
            let cross = (&c1 * c2.transpose()) * faer::Scale(1.0 / (n1 * n2).sqrt());
            let singular = cross
                .singular_values()
                .map_err(|e| FrechetError::LinearAlgebra(format!("SVD: {e:?}")))?;
            singular.iter().sum()
        }
        Method::Covariance => {
            let sigma1 = (c1.transpose() * &c1) * faer::Scale(1.0 / n1);
            let sigma2 = (c2.transpose() * &c2) * faer::Scale(1.0 / n2);
            trace_sqrt_product(&sigma1, &sigma2)?
        }
    };
    let fid = mean_term + trace1 + trace2 - 2.0 * trace_sqrt;
    Ok(Frechet { fid, mean_term, trace1, trace2, trace_sqrt, method })
}

/// tr √(Σ1Σ2) for symmetric positive semi-definite Σ1, Σ2, via Σ √λ(Σ1^½ Σ2 Σ1^½).
fn trace_sqrt_product(sigma1: &Mat<f64>, sigma2: &Mat<f64>) -> Result<f64, FrechetError> {
    let d = sigma1.nrows();
    let eig = sigma1
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| FrechetError::LinearAlgebra(format!("eigendecomposition: {e:?}")))?;
    let (u, s) = (eig.U(), eig.S().column_vector());
    let root: Vec<f64> = (0..d).map(|i| s[i].max(0.0).sqrt()).collect();
    let u_scaled = Mat::from_fn(d, d, |i, j| u[(i, j)] * root[j]);
    let half = &u_scaled * u.transpose();
    let product = &half * sigma2 * &half;
    // Symmetrise away rounding so the symmetric solver sees exactly what it assumes.
    let product = Mat::from_fn(d, d, |i, j| 0.5 * (product[(i, j)] + product[(j, i)]));
    let lambdas = product
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| FrechetError::LinearAlgebra(format!("eigenvalues: {e:?}")))?;
    let most_negative = lambdas.iter().cloned().fold(0.0f64, f64::min);
    if (-most_negative).sqrt() > IMAGINARY_TOLERANCE {
        return Err(FrechetError::Imaginary((-most_negative).sqrt()));
    }
    Ok(lambdas.iter().map(|l| l.max(0.0).sqrt()).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random features (no RNG crate needed for tests).
    fn features(n: usize, d: usize, seed: u64, shift: f64) -> Mat<f64> {
        let v = crate::recipe::uniform("test-features", seed, n * d);
        Mat::from_fn(n, d, |i, j| v[i * d + j] as f64 + shift * (j % 3) as f64)
    }

    #[test]
    fn identical_sets_are_at_distance_zero() {
        let x = features(12, 6, 1, 0.0);
        for method in [Method::NuclearNorm, Method::Covariance] {
            let f = frechet_distance_with(&x, &x, method).unwrap();
            assert!(f.fid.abs() < 1e-10, "{method:?}: {}", f.fid);
        }
    }

    #[test]
    fn both_methods_agree_when_n_exceeds_the_dimension() {
        let (a, b) = (features(40, 8, 1, 0.0), features(30, 8, 2, 0.5));
        let small = frechet_distance_with(&a, &b, Method::NuclearNorm).unwrap();
        let large = frechet_distance_with(&a, &b, Method::Covariance).unwrap();
        assert!((small.fid - large.fid).abs() < 1e-10 * small.fid.abs().max(1.0));
    }

    #[test]
    fn both_methods_agree_on_rank_deficient_covariances() {
        // N < d: the product of covariances is singular, the case the nuclear norm exists for.
        let (a, b) = (features(5, 16, 3, 0.0), features(7, 16, 4, 0.2));
        let small = frechet_distance_with(&a, &b, Method::NuclearNorm).unwrap();
        let large = frechet_distance_with(&a, &b, Method::Covariance).unwrap();
        assert!((small.fid - large.fid).abs() < 1e-7, "{} vs {}", small.fid, large.fid);
    }

    #[test]
    fn a_shift_of_the_mean_adds_its_squared_norm() {
        let a = features(10, 4, 5, 0.0);
        let b = Mat::from_fn(10, 4, |i, j| a[(i, j)] + 2.0);
        let f = frechet_distance(&a, &b).unwrap();
        assert!((f.fid - 16.0).abs() < 1e-9, "{}", f.fid);
    }

    #[test]
    fn a_single_image_is_an_error_not_a_nan() {
        let e = frechet_distance(&features(1, 4, 1, 0.0), &features(3, 4, 2, 0.0)).unwrap_err();
        assert_eq!(e, FrechetError::TooFew { which: "first", n: 1 });
    }

    #[test]
    fn non_finite_features_are_rejected_with_their_row() {
        let rows = vec![vec![0.0f32, 1.0], vec![f32::NAN, 0.0]];
        assert_eq!(
            to_matrix(&rows, "fake").unwrap_err(),
            FrechetError::NotFinite { which: "fake", row: 1 }
        );
    }

    #[test]
    fn few_images_use_the_nuclear_norm_and_many_the_covariances() {
        assert_eq!(Method::cheapest(10, 10, 2048), Method::NuclearNorm);
        assert_eq!(Method::cheapest(50_000, 50_000, 2048), Method::Covariance);
    }
}
