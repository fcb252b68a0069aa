//! Running a stage on this machine: its job becomes a [`NodeJob`] and runs in this process,
//! exactly as `sdpipe exec-stage` runs one on a cluster node.

use super::node::NodeJob;
use super::{ExecError, Executor, Job};
use crate::spec::Action;

/// Runs stages on this machine.
#[derive(Default)]
pub struct LocalExecutor;

impl Executor for LocalExecutor {
    fn execute(&self, job: Job<'_>) -> Result<(), ExecError> {
        let node_job = NodeJob::from_job(&job)?;
        let own = match &job.stage.action {
            Action::Builtin(kind) => Some(kind.clone()),
            Action::Shell { .. } => None,
        };
        let resolve = |name: &str| own.clone().filter(|k| k.name() == name);
        node_job.run(&resolve, job.log, job.progress, job.cancel)
    }
}
