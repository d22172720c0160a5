//! A tracing subscriber for binaries built on the cluster (the library itself
//! never installs one).

/// Installs a `tracing` subscriber writing to stderr, filtered by `RUST_LOG`
/// (default `info`). Call it at the top of `main`, before
/// [`Cluster::builder`](crate::Cluster::builder): it then runs in every process,
/// and each line carries the process's span (`role`, `worker.id`, `pid`).
///
/// - `TANDEM_LOG=json`: one JSON object per line (fields, span and level as
///   keys), for log shippers.
/// - Otherwise one human-readable line per event, with ANSI colours only when
///   stderr is a terminal (`NO_COLOR` set turns them off too).
///
/// Does nothing if a global subscriber is already set.
pub fn init_tracing() {
    init_tracing_with_default("info");
}

/// Whether `TANDEM_LOG=json` asks for JSON lines (then the master logs its
/// status table as a JSON event instead of printing a text table).
pub(crate) fn json_logs() -> bool {
    std::env::var("TANDEM_LOG").is_ok_and(|v| v.eq_ignore_ascii_case("json"))
}

/// [`init_tracing`] with another filter when `RUST_LOG` is unset (`warn`, `tandem=debug`, ...).
pub fn init_tracing_with_default(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = json_logs();
    // Err: a subscriber is already installed; keep it.
    if json {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
        let _ =
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_env_filter(filter).try_init();
    }
}

/// The span a child's log lines carry (`cluster`, `role`, `pid`, and the
/// worker's id or the agent's epoch). A standby's span says `role="standby"`
/// until its promotion, then (from the next poll of each task it
/// [instruments](Self::instrument) on) the agent's, with the promoted epoch:
/// a promoted standby logs as the agent it now is.
#[derive(Debug, Clone)]
pub(crate) struct ProcessSpan {
    span: tracing::Span,
    /// A standby's promotion and the agent span it switches to.
    promotion: Option<Promotable>,
}

#[derive(Debug, Clone)]
struct Promotable {
    promoted: tokio::sync::watch::Receiver<Option<crate::Promotion>>,
    cluster: std::sync::Arc<str>,
    pid: u32,
    agent: std::sync::Arc<std::sync::OnceLock<tracing::Span>>,
}

impl ProcessSpan {
    pub(crate) fn worker(cluster: &str, worker_id: Option<u32>, pid: u32) -> Self {
        let span = tracing::info_span!("tandem", cluster = %cluster, role = "worker", worker.id = worker_id, pid);
        ProcessSpan { span, promotion: None }
    }

    pub(crate) fn agent(cluster: &str, epoch: u64, pid: u32) -> Self {
        ProcessSpan { span: agent_span(cluster, epoch, pid), promotion: None }
    }

    /// A standby's: its epoch comes with the promotion `promoted` carries.
    pub(crate) fn standby(
        cluster: &str,
        pid: u32,
        promoted: tokio::sync::watch::Receiver<Option<crate::Promotion>>,
    ) -> Self {
        let span = tracing::info_span!("tandem", cluster = %cluster, role = "standby", pid);
        let promotion = Promotable {
            promoted,
            cluster: cluster.into(),
            pid,
            agent: std::sync::Arc::new(std::sync::OnceLock::new()),
        };
        ProcessSpan { span, promotion: Some(promotion) }
    }

    /// The span to enter now: the agent's once a standby is promoted.
    pub(crate) fn current(&self) -> &tracing::Span {
        let Some(p) = &self.promotion else { return &self.span };
        match *p.promoted.borrow() {
            Some(promotion) => p.agent.get_or_init(|| agent_span(&p.cluster, promotion.epoch, p.pid)),
            None => &self.span,
        }
    }

    /// `future`, each poll inside [`current`](Self::current) (tracing's
    /// `Instrument` keeps the span it was given).
    pub(crate) fn instrument<F: std::future::Future>(&self, future: F) -> InProcessSpan<F> {
        InProcessSpan { span: self.clone(), future: Box::pin(future) }
    }
}

/// The agent's span. `parent: None`: a promoted standby's lines show this
/// span alone, not nested in the standby's.
fn agent_span(cluster: &str, epoch: u64, pid: u32) -> tracing::Span {
    tracing::info_span!(parent: None, "tandem", cluster = %cluster, role = "agent", pid, epoch)
}

/// A future polled inside its process's current span ([`ProcessSpan::instrument`]).
pub(crate) struct InProcessSpan<F> {
    span: ProcessSpan,
    future: std::pin::Pin<Box<F>>,
}

impl<F: std::future::Future> std::future::Future for InProcessSpan<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = &mut *self;
        let _entered = this.span.current().enter();
        this.future.as_mut().poll(cx)
    }
}
