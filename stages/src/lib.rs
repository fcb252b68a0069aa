//! sdpipe's built-in stage kinds and the API they implement.
//!
//! [`api`] is the whole contract with the engine; every other module is one kind (or the
//! machinery one kind needs) and knows nothing of caching or scheduling.

pub mod api;
pub mod device;
#[cfg(feature = "candle")]
pub mod device_path;
pub mod imagefolder;
pub mod limits;
#[cfg(feature = "hub")]
pub mod model_fetch;
pub mod pillow;
pub mod synthetic;
pub mod testing;
pub mod unsplash;

use std::sync::Arc;

pub use api::{Registry, StageKind};

/// Every built-in kind, as the `sdpipe` binary registers them.
pub fn builtin() -> Registry {
    let mut registry = Registry::new();
    let kinds: Vec<Arc<dyn StageKind>> = vec![
        Arc::new(synthetic::Synthetic),
        Arc::new(synthetic::SceneAccuracy),
        Arc::new(imagefolder::ImageFolder),
        Arc::new(unsplash::UnsplashLite),
    ];
    for kind in kinds {
        registry.register(kind);
    }
    registry
}
