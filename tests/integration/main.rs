//! sdpipe's integration tests, one test binary (each binary links the whole library with
//! candle, so one instead of one per file saves CI build time and disk). Each file here is a
//! module, and a test's name starts with its module: `cargo test --test integration seed::`
//! runs one file's tests.
//!
//! The tests run the real `sdpipe` binary (`common`), so they share no state through this
//! process: none sets an environment variable, changes directory or installs a signal handler
//! here. The Slurm tests (`slurm`) are skipped unless `SDPIPE_SLURM_TESTS=1`; scripts/test.sh
//! runs them with `cargo test --test integration slurm::`.

mod common;
mod s3_server;

mod architecture;
mod caching;
mod commands;
mod corruption;
mod data_stages;
mod demo;
mod device;
mod experiments;
mod failures;
mod hostile_input;
mod hostile_models;
mod jpeg_readers;
mod json_contract;
mod ml_pipeline;
mod process_group;
mod remote;
mod report_gather;
mod seed;
mod slurm;
mod spec_errors;
mod spec_never_panics;
mod sweeps;
mod torture;
