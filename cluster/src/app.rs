//! The user's three start functions, as the builder takes them and the
//! master, the agent and the workers run them.

use futures::future::BoxFuture;

use crate::BoxError;
use crate::agent::AgentContext;
use crate::master_context::MasterContext;
use crate::worker::WorkerContext;

pub(crate) type AgentFn = Box<dyn FnOnce(AgentContext) -> BoxFuture<'static, Result<(), BoxError>> + Send>;
pub(crate) type WorkerFn = Box<dyn FnOnce(WorkerContext) -> BoxFuture<'static, Result<(), BoxError>> + Send>;
pub(crate) type MasterFn = Box<dyn FnOnce(MasterContext) -> BoxFuture<'static, Result<(), BoxError>> + Send>;
