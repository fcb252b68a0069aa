//! sdpipe: declarative, cached, reproducible pipelines for Stable Diffusion finetuning
//! experiments.
//!
//! The engine knows nothing of machine learning: a pipeline file ([`spec`]) becomes a graph of
//! stages ([`dag`]); each stage's key is a digest of everything it depends on ([`key`],
//! [`fingerprint`], [`hash`]); results live in a content-addressed cache ([`cache`]); the
//! [`scheduler`] runs stale stages through an [`executor`] and commits their outputs. Stage kinds
//! come from the `sdpipe-stages` crate through its `api` module.
//!
//! The modules form layers, and each imports only from its own layer or those below (the
//! integration test `architecture` checks this, and that no two modules import each other):
//!
//! | layer | modules | what it owns |
//! |---|---|---|
//! | core | [`hash`], [`key`], [`lock`], [`cache`], [`materialize`] | digests, keys, the store and index, files on disk |
//! | spec | [`spec`] | the pipeline file: parsing, validation, sweeps |
//! | plan | [`dag`], [`fingerprint`], [`freshness`], [`project`], [`summary`] | what a run would do and why |
//! | run | [`scheduler`], [`events`], [`executor`], [`remote`], [`journal`], [`ui`], [`maintenance`], [`kinds`] | doing it |
//! | cli | [`cli`], [`experiments`] | commands and what they print |

pub mod cache;
pub mod cli;
pub mod dag;
pub mod events;
pub mod executor;
pub mod experiments;
pub mod fingerprint;
pub mod freshness;
pub mod hash;
pub mod journal;
pub mod key;
pub mod kinds;
pub mod lock;
pub mod maintenance;
pub mod materialize;
pub mod project;
pub mod remote;
pub mod scheduler;
pub mod spec;
pub mod summary;
pub mod ui;
