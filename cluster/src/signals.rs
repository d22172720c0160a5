//! The signals the master and the children handle. The order of a graceful
//! stop they start is [`stop`](crate::stop)'s.
//!
//! ```text
//! SIGTERM/SIGINT -> master: stop restarting; Stop{grace} to every worker
//!                   (their stop token is cancelled) ... workers exit
//!                   worker grace over: SIGKILL the rest, reap them (waitpid)
//!               -> Stop{grace} to the agent ... agent exits (or SIGKILL, reap)
//!               -> status table to stderr, runtime dir removed, exit 0
//! a second SIGTERM/SIGINT: skip what is left of the grace: SIGKILL and reap all
//! ```
//!
//! Workers go before the agent so their Followers never lose the Leader while
//! they drain (eggjs/cluster#76). Children ignore SIGINT (a terminal's Ctrl-C
//! reaches the whole process group; the master coordinates) and treat SIGTERM
//! sent to them alone as their own graceful stop.

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// What a signal asks the master to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MasterSignal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGUSR1: print the status table.
    Status,
    /// SIGHUP: reload the workers.
    Reload,
}

/// The master's signal handlers.
#[derive(Debug)]
pub(crate) struct MasterSignals {
    term: Signal,
    int: Signal,
    usr1: Signal,
    hup: Signal,
}

impl MasterSignals {
    pub(crate) fn install() -> io::Result<Self> {
        Ok(MasterSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub(crate) async fn recv(&mut self) -> MasterSignal {
        tokio::select! {
            _ = self.term.recv() => MasterSignal::Stop,
            _ = self.int.recv() => MasterSignal::Stop,
            _ = self.usr1.recv() => MasterSignal::Status,
            _ = self.hup.recv() => MasterSignal::Reload,
        }
    }
}

/// In a child: SIGTERM cancels `stop` (a graceful stop of this process alone);
/// SIGINT is ignored, since the master coordinates a terminal's Ctrl-C.
pub(crate) fn child_signals(stop: CancellationToken) -> io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        loop {
            tokio::select! {
                Some(()) = term.recv() => {
                    tracing::info!("SIGTERM: stopping gracefully");
                    stop.cancel();
                }
                Some(()) = int.recv() => tracing::debug!("SIGINT ignored: the master coordinates shutdown"),
                else => return,
            }
        }
    })
}
