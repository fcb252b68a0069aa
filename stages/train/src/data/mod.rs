//! Training data: the imagefolder's training split, the reference image transform, and the
//! seeded schedule of which examples each optimiser step sees.

pub mod dataset;
pub mod plan;
pub mod transform;

pub use dataset::{load_split, load_train_split, read_rgb, DatasetError, Example};
pub use plan::{MicroBatch, Plan, StepPlan};
pub use transform::{Augmentation, Transform};
