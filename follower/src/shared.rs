//! What a connection's handles share with its driver: the status the driver
//! publishes, the request id counter and the slots path's call table. Its own
//! module, so that the connection, the driver and its core all depend on it and
//! not on each other.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::sync::watch;

use crate::slots::Slots;
use crate::state::Status;

/// What the handles share with the driver.
pub(crate) struct Shared {
    pub(crate) status: watch::Sender<Status>,
    pub(crate) next_id: Arc<AtomicU64>,
    pub(crate) slots: Arc<Slots>,
}
