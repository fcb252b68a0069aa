//! The stage kinds the `sdpipe` binary knows: the data kinds (`sdpipe-data`) plus one crate per
//! ML area. The engine itself only ever sees the [`Registry`].

use sdpipe_stages::api::Registry;

/// Every built-in kind.
pub fn builtin() -> Registry {
    let mut registry = Registry::new();
    let crates = [
        sdpipe_data::kinds(),
        sdpipe_caption::kinds(),
        sdpipe_diffusion::kinds(),
        sdpipe_train::kinds(),
        sdpipe_metrics::kinds(),
        sdpipe_report::kinds(),
    ];
    for kind in crates.into_iter().flatten() {
        registry.register(kind);
    }
    registry
}
