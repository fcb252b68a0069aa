//! Element loops compiled three times, for the baseline x86-64, for AVX2 and for AVX-512, and
//! chosen at run time by what the CPU has, so that their arithmetic runs in 8 or 16 f32 lanes
//! instead of 4. Shared by the activations ([`crate::pointwise`]) and group normalisation
//! ([`crate::group_norm`]); [`multiversion!`] makes the same three builds of other loops (the
//! attention's softmax, forward and backward).
//!
//! Every version performs the same operations per element in the same order, so they give the
//! same bits: Rust never contracts a multiply and an add into an FMA on its own, and an explicit
//! `mul_add` is one correctly rounded operation in every build (an instruction in the AVX2 and
//! AVX-512 ones, which are built with FMA; libm's `fmaf` in the baseline one).

/// Defines `$name`, which runs `$body` (an `#[inline(always)]` function of the same signature)
/// compiled for AVX-512 where the CPU has it, else for AVX2 with FMA, else for the baseline
/// x86-64, and the two builds `$avx2` and `$avx512` it dispatches to (unsafe: for CPUs with the
/// feature; tests call them to compare their bits with `$body`'s).
macro_rules! multiversion {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident[$($generics:tt)*]($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
            = $body:ident, built as $avx2:ident, $avx512:ident;
    ) => {
        $(#[$attr])*
        $vis fn $name<$($generics)*>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                return unsafe { $avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                return unsafe { $avx2($($arg),*) };
            }
            $body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        $vis unsafe fn $avx2<$($generics)*>($($arg: $ty),*) $(-> $ret)? {
            $body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        $vis unsafe fn $avx512<$($generics)*>($($arg: $ty),*) $(-> $ret)? {
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `out[i] = f(x[i], g[i])` (`g` ignored by a unary `f`), on this thread.
    pub(crate) fn apply[T: Copy, F: Fn(T, T) -> T](out: &mut [T], x: &[T], g: &[T], f: F)
        = apply_portable, built as apply_avx2, apply_avx512;
}

#[inline(always)]
pub(crate) fn apply_portable<T: Copy, F: Fn(T, T) -> T>(out: &mut [T], x: &[T], g: &[T], f: F) {
    for ((o, &v), &d) in out.iter_mut().zip(x).zip(g) {
        *o = f(v, d);
    }
}

/// A stateless element function `(x, g) → out` for [`apply_kernel`]: a zero-sized type whose
/// `call` is `#[inline(always)]`.
///
/// Why not a closure or a function item: passed as [`apply`]'s `F`, a large body (GELU's
/// backward: an erf and two exponentials) was built as a function of its own for the baseline
/// x86-64 and called once per element from the AVX-512 loop, unvectorised, each fused
/// multiply-add a call into libm (a tenth of a mid-size training step). A static call of an
/// `#[inline(always)]` method is always inlined into each build.
pub(crate) trait Kernel<T>: Copy {
    fn call(self, x: T, g: T) -> T;
}

multiversion! {
    /// `out[i] = kernel.call(x[i], g[i])` (`g` ignored by a unary kernel), on this thread.
    pub(crate) fn apply_kernel[T: Copy, K: Kernel<T>](out: &mut [T], x: &[T], g: &[T], kernel: K)
        = apply_kernel_portable, built as apply_kernel_avx2, apply_kernel_avx512;
}

#[inline(always)]
pub(crate) fn apply_kernel_portable<T: Copy, K: Kernel<T>>(
    out: &mut [T],
    x: &[T],
    g: &[T],
    kernel: K,
) {
    for ((o, &v), &d) in out.iter_mut().zip(x).zip(g) {
        *o = kernel.call(v, d);
    }
}

/// Lanes of the f64 accumulators: independent partial sums the compiler can keep in vector
/// registers (and that bound the rounding error's growth).
const LANES: usize = 8;

multiversion! {
    /// `(Σ f(x[i], g[i]), Σ h(x[i], g[i]))` accumulated in f64, on this thread (`g` may be `x`).
    pub(crate) fn sums[T: Copy, F: Fn(T, T) -> (f64, f64)](x: &[T], g: &[T], f: F) -> (f64, f64)
        = sums_portable, built as sums_avx2, sums_avx512;
}

#[inline(always)]
fn sums_portable<T: Copy, F: Fn(T, T) -> (f64, f64)>(x: &[T], g: &[T], f: F) -> (f64, f64) {
    let (mut first, mut second) = ([0f64; LANES], [0f64; LANES]);
    let (xs, gs) = (x.chunks_exact(LANES), g.chunks_exact(LANES));
    let (x_rest, g_rest) = (xs.remainder(), gs.remainder());
    for (x, g) in xs.zip(gs) {
        for lane in 0..LANES {
            let (a, b) = f(x[lane], g[lane]);
            first[lane] += a;
            second[lane] += b;
        }
    }
    for (lane, (&x, &g)) in x_rest.iter().zip(g_rest).enumerate() {
        let (a, b) = f(x, g);
        first[lane] += a;
        second[lane] += b;
    }
    (first.iter().sum(), second.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_add_every_element_including_the_remainder() {
        let x: Vec<f32> = (1..=21).map(|i| i as f32).collect();
        let (sum, squares) = sums(&x, &x, |v, _| (v as f64, (v as f64) * (v as f64)));
        assert_eq!(sum, 231.0);
        assert_eq!(squares, 3311.0);
    }
}
