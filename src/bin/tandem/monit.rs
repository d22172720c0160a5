//! `tandem monit NAME`: a live view of one cluster in the terminal, refreshed
//! every second from the master's control socket.
//!
//! Per process: role, slot, pid, state, CPU %, RSS, restarts, uptime. For the
//! Leader: epoch, followers, keys, events/s, calls/s, calls in flight, and
//! each channel's upstream up or down. Keys: ↑/↓ (or k/j) select a process,
//! `R` restarts the selected one (a worker: its successor ready first; the
//! agent: replaced), `r` reloads the workers, `a` reloads the agent — each
//! after a `y` confirmation — and `q` (or Esc, Ctrl-C) quits.
//!
//! The view is a pure model ([`Monit`]: status in, key in, lines out) drawn by
//! ratatui; the loop waits for a key or the next second, so an idle view costs
//! one status request and one redraw a second.

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table, TableState};
use serde::Deserialize;
use tandem::cluster::control::{ControlClient, ControlError, ProcessInfo, Request};

/// How often the view asks the master for its status.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How long a status request may take before the view says the master is not
/// answering (and keeps running: keys still work).
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// An action the user asked for and confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace the workers one by one.
    Reload,
    /// Replace the agent.
    ReloadAgent,
    /// Restart this worker (its successor ready first, then it drains).
    RestartWorker(u32),
    /// Restart the agent.
    RestartAgent,
}

impl Action {
    fn question(self) -> String {
        match self {
            Action::Reload => "Reload every worker, one at a time? (y/n)".into(),
            Action::ReloadAgent => "Reload the agent (its Leader fails over to a new one)? (y/n)".into(),
            Action::RestartWorker(id) => format!("Restart worker {id} (its successor ready first)? (y/n)"),
            Action::RestartAgent => "Restart the agent (its Leader fails over to a new one)? (y/n)".into(),
        }
    }

    fn request(self) -> Request {
        match self {
            Action::Reload => Request::Reload,
            Action::ReloadAgent => Request::ReloadAgent,
            Action::RestartWorker(worker) => Request::Restart { worker },
            Action::RestartAgent => Request::RestartAgent,
        }
    }

    fn what(self) -> String {
        match self {
            Action::Reload => "reload".into(),
            Action::ReloadAgent => "agent reload".into(),
            Action::RestartWorker(id) => format!("restart of worker {id}"),
            Action::RestartAgent => "restart of the agent".into(),
        }
    }
}

/// What a key does to the view.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to send.
    Stay,
    /// Send this confirmed action to the master.
    Run(Action),
    /// Leave the view.
    Quit,
}

/// The Leader's counters that the view turns into rates: the part of
/// `tandem_leader::Stats` it reads (unknown fields are ignored).
#[derive(Debug, Clone, Default, Deserialize)]
struct LeaderStats {
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    followers: usize,
    #[serde(default)]
    in_flight: usize,
    #[serde(default)]
    events_sent: u64,
    #[serde(default)]
    channels: Vec<ChannelStats>,
    #[serde(default)]
    call_latency: Calls,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ChannelStats {
    name: String,
    #[serde(default)]
    upstream: serde_json::Value,
    #[serde(default)]
    subscriptions: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Calls {
    #[serde(default)]
    count: u64,
}

/// The view's state.
#[derive(Debug, Default)]
pub struct Monit {
    name: String,
    rows: Vec<ProcessInfo>,
    leader: Option<LeaderStats>,
    /// The previous sample of (events sent, calls answered) and when.
    previous: Option<(u64, u64, Instant)>,
    rates: Option<(f64, f64)>,
    selected: usize,
    confirming: Option<Action>,
    /// The last outcome or error, shown under the table.
    message: Option<String>,
}

impl Monit {
    /// An empty view of the cluster `name`.
    pub fn new(name: impl Into<String>) -> Monit {
        Monit { name: name.into(), ..Monit::default() }
    }

    /// A new status answer, received at `at`.
    pub fn on_status(&mut self, rows: Vec<ProcessInfo>, at: Instant) {
        let leader = rows.iter().find(|r| r.role == "agent").and_then(|r| r.leader.clone());
        self.leader = leader.and_then(|value| serde_json::from_value(value).ok());
        match &self.leader {
            Some(stats) => {
                let now = (stats.events_sent, stats.call_latency.count, at);
                if let Some((events, calls, then)) = self.previous {
                    let secs = at.duration_since(then).as_secs_f64();
                    // A new Leader starts its counters at zero: no rate across it.
                    if secs > 0.0 && now.0 >= events && now.1 >= calls {
                        self.rates = Some(((now.0 - events) as f64 / secs, (now.1 - calls) as f64 / secs));
                    } else {
                        self.rates = None;
                    }
                }
                self.previous = Some(now);
            }
            None => (self.previous, self.rates) = (None, None),
        }
        self.rows = rows;
        self.selected = self.selected.min(self.rows.len().saturating_sub(1));
    }

    /// The master did not answer.
    pub fn on_error(&mut self, error: &ControlError) {
        self.message = Some(format!("no status: {error}"));
    }

    /// The outcome of an action sent to the master.
    pub fn on_outcome(&mut self, action: Action, outcome: Result<(), ControlError>) {
        let what = action.what();
        self.message = Some(match outcome {
            Ok(()) => format!("{what} done"),
            Err(e) => format!("{what} failed: {e}"),
        });
    }

    /// A key: moves the selection, asks to confirm an action, or quits.
    pub fn on_key(&mut self, key: KeyEvent) -> Step {
        if key.kind != KeyEventKind::Press {
            return Step::Stay;
        }
        if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
            return Step::Quit;
        }
        if let Some(action) = self.confirming.take() {
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => {
                    self.message = Some(format!("{}...", action.what()));
                    Step::Run(action)
                }
                _ => {
                    self.message = Some("cancelled".into());
                    Step::Stay
                }
            };
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Step::Quit,
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected = self.selected.saturating_sub(1);
                Step::Stay
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(self.rows.len().saturating_sub(1));
                Step::Stay
            }
            KeyCode::Char('r') => self.confirm(Action::Reload),
            KeyCode::Char('a') => self.confirm(Action::ReloadAgent),
            KeyCode::Char('R') => match self.rows.get(self.selected) {
                Some(row) if row.role == "worker" && row.slot.is_some() => {
                    self.confirm(Action::RestartWorker(row.slot.unwrap_or_default()))
                }
                Some(row) if row.role == "agent" => self.confirm(Action::RestartAgent),
                Some(_) => {
                    self.message = Some("the master cannot be restarted from here (stop and start the cluster)".into());
                    Step::Stay
                }
                None => Step::Stay,
            },
            _ => Step::Stay,
        }
    }

    fn confirm(&mut self, action: Action) -> Step {
        self.confirming = Some(action);
        self.message = Some(action.question());
        Step::Stay
    }

    /// The Leader's line: epoch, followers, keys, rates, in flight, upstreams.
    pub fn leader_line(&self) -> String {
        let Some(stats) = &self.leader else {
            return "leader: no report (the agent is starting or not answering)".into();
        };
        let keys: usize = stats.channels.iter().map(|c| c.subscriptions).sum();
        let rates = match self.rates {
            Some((events, calls)) => format!("{events:.0} events/s, {calls:.0} calls/s"),
            None => "rates after the next refresh".into(),
        };
        let upstreams: Vec<String> =
            stats.channels.iter().map(|c| format!("{}={}", c.name, upstream_word(&c.upstream))).collect();
        format!(
            "leader: epoch {}, {} followers, {} keys, {rates}, {} in flight; upstream {}",
            stats.epoch,
            stats.followers,
            keys,
            stats.in_flight,
            upstreams.join(" ")
        )
    }

    fn draw(&self, frame: &mut ratatui::Frame<'_>) {
        let [title, table, leader, footer] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(4), Constraint::Length(2), Constraint::Length(2)])
                .areas(frame.area());
        frame.render_widget(Paragraph::new(format!("tandem monit {} — every {REFRESH:?}", self.name)), title);
        let header = Row::new(["ROLE", "SLOT", "PID", "STATE", "CPU%", "RSS", "RESTARTS", "UPTIME", "LAST EXIT"])
            .style(Style::default().add_modifier(Modifier::BOLD));
        let rows = self.rows.iter().map(|r| {
            Row::new([
                r.role.clone(),
                r.slot.map_or("-".into(), |s| s.to_string()),
                r.pid.map_or("-".into(), |p| p.to_string()),
                r.state.clone(),
                r.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
                r.rss_bytes.map_or("-".into(), |b| format!("{:.1}M", b as f64 / 1_048_576.0)),
                r.restarts.to_string(),
                r.uptime_ms.map_or("-".into(), |ms| human(Duration::from_millis(ms))),
                r.last_exit.clone().unwrap_or_else(|| "-".into()),
            ])
        });
        let widths = [
            Constraint::Length(7),
            Constraint::Length(5),
            Constraint::Length(8),
            Constraint::Length(16),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Min(9),
        ];
        let table_widget = Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::TOP))
            .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
        let mut state = TableState::default().with_selected(Some(self.selected));
        frame.render_stateful_widget(table_widget, table, &mut state);
        frame.render_widget(Paragraph::new(self.leader_line()), leader);
        let help = "↑/↓ select   R restart selected   r reload workers   a reload agent   q quit";
        let lines = vec![Line::from(self.message.clone().unwrap_or_default()), Line::from(help)];
        frame.render_widget(Paragraph::new(lines), footer);
    }
}

/// `Ready`, `Starting` or `Down(...)` as JSON, in one word.
fn upstream_word(state: &serde_json::Value) -> &'static str {
    match state {
        serde_json::Value::String(s) if s == "Ready" => "up",
        serde_json::Value::String(s) if s == "Starting" => "starting",
        serde_json::Value::Object(o) if o.contains_key("Down") => "down",
        _ => "?",
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Runs the view until the user quits. The terminal is restored whatever
/// happens (ratatui's `init`/`restore`, also on a panic).
pub async fn run(name: String) -> Result<(), ControlError> {
    // Fail before touching the terminal if the cluster is not there.
    let mut client = ControlClient::connect(&name).await?;
    let mut terminal = ratatui::init();
    let result = view(&name, &mut client, &mut terminal).await;
    ratatui::restore();
    result
}

async fn view(
    name: &str,
    client: &mut ControlClient,
    terminal: &mut ratatui::DefaultTerminal,
) -> Result<(), ControlError> {
    let mut monit = Monit::new(name);
    let mut next_refresh = Instant::now();
    // An action sent to the master runs in its own task, so keys (q) and the
    // refresh keep working while a reload takes its time.
    let mut running: Option<(Action, tokio::task::JoinHandle<Result<(), ControlError>>)> = None;
    loop {
        if running.as_ref().is_some_and(|(_, task)| task.is_finished()) {
            let (action, task) = running.take().expect("checked");
            let outcome =
                task.await.unwrap_or_else(|e| Err(ControlError::Protocol(format!("the request failed: {e}"))));
            monit.on_outcome(action, outcome);
            next_refresh = Instant::now();
        }
        if Instant::now() >= next_refresh {
            let status = client.call_within(name, Request::Status, STATUS_TIMEOUT).await;
            match status.and_then(|value| {
                serde_json::from_value::<Vec<ProcessInfo>>(value).map_err(|e| ControlError::Protocol(e.to_string()))
            }) {
                Ok(rows) => monit.on_status(rows, Instant::now()),
                Err(e) => {
                    monit.on_error(&e);
                    // The connection may be gone (a restarted master): connect again next time.
                    if let Ok(Ok(again)) = tokio::time::timeout(STATUS_TIMEOUT, ControlClient::connect(name)).await {
                        *client = again;
                    }
                }
            }
            next_refresh = Instant::now() + REFRESH;
            terminal.draw(|frame| monit.draw(frame)).map_err(|e| ControlError::Protocol(format!("terminal: {e}")))?;
        }
        let mut wait = next_refresh.saturating_duration_since(Instant::now());
        if running.is_some() {
            wait = wait.min(Duration::from_millis(100));
        }
        // crossterm's poll blocks: off the runtime's threads.
        let key = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Event>> {
            if event::poll(wait)? { Ok(Some(event::read()?)) } else { Ok(None) }
        })
        .await
        .map_err(|e| ControlError::Protocol(format!("terminal: {e}")))?
        .map_err(|e| ControlError::Protocol(format!("terminal: {e}")))?;
        let Some(Event::Key(key)) = key else { continue };
        match monit.on_key(key) {
            Step::Quit => return Ok(()),
            Step::Stay => {}
            Step::Run(action) if running.is_some() => {
                monit.message = Some(format!("{action:?} not sent: the previous request is still running"));
            }
            Step::Run(action) => {
                let name = name.to_owned();
                let task = tokio::spawn(async move {
                    ControlClient::connect(&name).await?.call(action.request()).await.map(|_| ())
                });
                running = Some((action, task));
            }
        }
        terminal.draw(|frame| monit.draw(frame)).map_err(|e| ControlError::Protocol(format!("terminal: {e}")))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn row(role: &str, slot: Option<u32>, leader: Option<serde_json::Value>) -> ProcessInfo {
        serde_json::from_value(serde_json::json!({
            "role": role, "slot": slot, "pid": 10, "state": "online", "restarts": 0,
            "uptime_ms": 61_000, "cpu_percent": 1.5, "cpu_seconds": 0.1, "rss_bytes": 16_777_216,
            "epoch": null, "last_exit": null, "leader": leader,
        }))
        .unwrap()
    }

    fn stats(events: u64, calls: u64) -> serde_json::Value {
        serde_json::json!({
            "epoch": 2, "followers": 4, "in_flight": 1, "events_sent": events,
            "channels": [{"name": "config", "upstream": "Ready", "subscriptions": 3},
                         {"name": "services", "upstream": {"Down": {"kind": "Unavailable"}}, "subscriptions": 1}],
            "call_latency": {"count": calls, "sum_seconds": 0.0, "buckets": []},
            "unknown_field": true,
        })
    }

    #[test]
    fn rates_come_from_two_samples_and_not_across_a_new_leader() {
        let mut monit = Monit::new("shop");
        let t0 = Instant::now();
        monit.on_status(vec![row("master", None, None), row("agent", None, Some(stats(100, 10)))], t0);
        assert!(monit.leader_line().contains("rates after the next refresh"), "{}", monit.leader_line());
        monit.on_status(vec![row("agent", None, Some(stats(300, 60)))], t0 + Duration::from_secs(2));
        let line = monit.leader_line();
        assert!(line.contains("epoch 2, 4 followers, 4 keys, 100 events/s, 25 calls/s, 1 in flight"), "{line}");
        assert!(line.contains("upstream config=up services=down"), "{line}");
        // A new Leader's counters restart at zero: no negative rate.
        monit.on_status(vec![row("agent", None, Some(stats(5, 1)))], t0 + Duration::from_secs(3));
        assert!(monit.leader_line().contains("rates after the next refresh"));
        monit.on_status(vec![row("agent", None, None)], t0 + Duration::from_secs(4));
        assert!(monit.leader_line().starts_with("leader: no report"));
    }

    #[test]
    fn an_action_runs_only_after_yes_and_the_selection_stays_in_the_table() {
        let mut monit = Monit::new("shop");
        monit.on_status(vec![row("master", None, None), row("worker", Some(1), None)], Instant::now());
        assert_eq!(monit.on_key(key(KeyCode::Char('r'))), Step::Stay);
        assert_eq!(monit.on_key(key(KeyCode::Char('n'))), Step::Stay, "n cancels");
        assert_eq!(monit.message.as_deref(), Some("cancelled"));
        assert_eq!(monit.on_key(key(KeyCode::Char('a'))), Step::Stay);
        assert_eq!(monit.on_key(key(KeyCode::Char('y'))), Step::Run(Action::ReloadAgent));
        assert_eq!(monit.on_key(key(KeyCode::Char('r'))), Step::Stay);
        assert_eq!(monit.on_key(key(KeyCode::Char('y'))), Step::Run(Action::Reload));
        for _ in 0..5 {
            monit.on_key(key(KeyCode::Down));
        }
        assert_eq!(monit.selected, 1);
        monit.on_key(key(KeyCode::Up));
        monit.on_key(key(KeyCode::Up));
        assert_eq!(monit.selected, 0);
        // R restarts the selected process: not the master; a worker by its id.
        assert_eq!(monit.on_key(key(KeyCode::Char('R'))), Step::Stay);
        assert!(monit.message.as_deref().is_some_and(|m| m.contains("master cannot be restarted")));
        monit.on_key(key(KeyCode::Down));
        assert_eq!(monit.on_key(key(KeyCode::Char('R'))), Step::Stay);
        assert_eq!(monit.message.as_deref(), Some("Restart worker 1 (its successor ready first)? (y/n)"));
        assert_eq!(monit.on_key(key(KeyCode::Char('y'))), Step::Run(Action::RestartWorker(1)));
        assert_eq!(monit.on_key(key(KeyCode::Char('q'))), Step::Quit);
        assert_eq!(monit.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Step::Quit);
    }

    #[test]
    fn the_view_draws_every_process_and_the_leader() {
        let mut monit = Monit::new("shop");
        let now = Instant::now();
        monit.on_status(
            vec![row("master", None, None), row("agent", None, Some(stats(1, 1))), row("worker", Some(1), None)],
            now,
        );
        let backend = ratatui::backend::TestBackend::new(100, 14);
        let mut terminal = ratatui::Terminal::new(backend).unwrap();
        terminal.draw(|frame| monit.draw(frame)).unwrap();
        let screen: String = terminal.backend().buffer().content().iter().map(|c| c.symbol()).collect();
        for expected in ["tandem monit shop", "ROLE", "master", "agent", "worker", "16.0M", "1m1s", "epoch 2", "q quit"]
        {
            assert!(screen.contains(expected), "{expected:?} missing from the screen:\n{screen}");
        }
    }
}
