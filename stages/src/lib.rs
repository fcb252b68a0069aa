//! The stage API: [`api`] is the whole contract between the engine and the stage kinds, which
//! live in their own crates (sdpipe-data, sdpipe-caption, sdpipe-diffusion, sdpipe-train,
//! sdpipe-metrics, sdpipe-report) and know nothing of caching or scheduling. Also a test
//! harness for kinds ([`testing`]) and what several kinds share: the device choice, size caps
//! for model files ([`limits`]), Pillow-exact resampling ([`pillow`]), hub fetching and what the
//! toy-model kinds build their random-weight models from (`tiny_models`). [`exp_cells`] is how
//! `exp show` prints a cell, shared with the report kind's copy of that table. [`process`] is
//! the start-up every binary that runs stages makes: candle's threads ([`cpu_threads`]) and
//! freed memory kept for reuse ([`heap`]). With `candle`: which ops run hand-written CPU
//! kernels ([`device_path`]) and the host slices they read ([`host_slice`]).

// The derives in `params` name this crate by its path, also from inside it (its tests).
extern crate self as sdpipe_stages;

pub mod api;
pub mod cpu_threads;
pub mod device;
#[cfg(feature = "candle")]
pub mod device_path;
pub mod exp_cells;
pub mod heap;
#[cfg(feature = "candle")]
pub mod host_slice;
pub mod limits;
#[cfg(feature = "hub")]
pub mod model_fetch;
pub mod params;
pub mod pillow;
pub mod process;
pub mod testing;
#[cfg(feature = "tiny-models")]
pub mod tiny_models;

pub use api::{Registry, StageKind};
