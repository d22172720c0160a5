//! The tasks an `Upstream` adapter runs to follow its subscribed keys: one per
//! (channel, key), aborted when replaced, when the key is unsubscribed, and
//! when the adapter is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use tokio::task::AbortHandle;

#[derive(Debug, Default)]
pub(crate) struct FollowTasks {
    tasks: Mutex<HashMap<(&'static str, String), AbortHandle>>,
}

impl FollowTasks {
    /// Spawns the task following `key` of `channel`, replacing (and aborting) any earlier one.
    pub(crate) fn spawn(&self, channel: &'static str, key: String, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = tasks.insert((channel, key), handle) {
            old.abort();
        }
    }

    /// Stops following `key` of `channel`.
    pub(crate) fn stop(&self, channel: &'static str, key: String) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = tasks.remove(&(channel, key)) {
            handle.abort();
        }
    }
}

impl Drop for FollowTasks {
    fn drop(&mut self) {
        for (_, handle) in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()).drain() {
            handle.abort();
        }
    }
}
