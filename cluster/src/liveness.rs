//! Whether a ready child still answers: the master pings it over IPC every
//! [`Config::ping_interval`](crate::Config::ping_interval), the child answers
//! from the task that reads its IPC channel (so from its tokio runtime: a
//! runtime whose threads are all blocked does not answer), and a child silent
//! for its hang timeout is judged hung, SIGKILLed and restarted as after a crash.
//!
//! ```text
//! master                                   child (its runtime's IPC reader)
//!   | Ping{seq}     every ping_interval      |
//!   |--------------------------------------->|
//!   |                              Pong{seq} |
//!   |<---------------------------------------|
//!   | no Pong for hang_timeout: SIGKILL, restart (a new epoch for the agent)
//! ```
//!
//! The decision is I/O-free ([`Liveness::tick`]) and tested with paused time.

use std::time::Duration;

use tokio::time::Instant;

/// What the master does at a ping tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Send `Ping { seq }`.
    Ping(u64),
    /// No answer for this long: the process is hung.
    Hung { silent_for: Duration },
}

/// The ping state of one process.
#[derive(Debug)]
pub(crate) struct Liveness {
    hang_timeout: Duration,
    /// When the process last answered (or when watching began).
    last_answer: Instant,
    /// When the master last ticked: a master that was itself stalled (SIGSTOP,
    /// a suspended host) cannot tell whether its child answered meanwhile.
    last_tick: Instant,
    /// The last ping sent.
    seq: u64,
}

impl Liveness {
    /// Starts watching a process that is ready now, pinged every `interval`.
    /// A hang timeout shorter than two intervals is raised to that: a process
    /// gets at least one ping's round trip before it is judged.
    pub(crate) fn new(hang_timeout: Duration, interval: Duration, now: Instant) -> Self {
        let hang_timeout = hang_timeout.max(interval.saturating_mul(2));
        Liveness { hang_timeout, last_answer: now, last_tick: now, seq: 0 }
    }

    /// One ping tick: ping again, or the process is hung.
    pub(crate) fn tick(&mut self, now: Instant) -> Verdict {
        if now.saturating_duration_since(self.last_tick) >= self.hang_timeout {
            // The master did not run for a whole timeout: its own stall, not
            // the child's silence. Start counting afresh.
            self.last_answer = now;
        }
        self.last_tick = now;
        let silent_for = now.saturating_duration_since(self.last_answer);
        if silent_for >= self.hang_timeout {
            return Verdict::Hung { silent_for };
        }
        self.seq += 1;
        Verdict::Ping(self.seq)
    }

    /// The process answered ping `seq`. A late answer to an earlier ping counts
    /// too (the runtime ran); one to a ping never sent is ignored.
    pub(crate) fn answered(&mut self, seq: u64, now: Instant) {
        if seq >= 1 && seq <= self.seq {
            self.last_answer = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const EVERY: Duration = Duration::from_secs(1);
    const HANG: Duration = Duration::from_secs(3);

    /// Ticks every `EVERY` until hung; `answer` says whether each ping is answered. Returns
    /// how many pings were sent, and the silence at the verdict.
    async fn run(live: &mut Liveness, answer: impl Fn(u64) -> bool) -> (u64, Duration) {
        for _ in 0..100 {
            advance(EVERY).await;
            match live.tick(Instant::now()) {
                Verdict::Ping(seq) => {
                    if answer(seq) {
                        live.answered(seq, Instant::now());
                    }
                }
                Verdict::Hung { silent_for } => return (live.seq, silent_for),
            }
        }
        panic!("never judged hung");
    }

    #[tokio::test(start_paused = true)]
    async fn a_process_that_answers_is_never_hung_and_one_that_stops_is_hung_after_the_timeout() {
        let mut live = Liveness::new(HANG, EVERY, Instant::now());
        // Answers the first 10 pings, then goes silent (SIGSTOP).
        let (pings, silent_for) = run(&mut live, |seq| seq <= 10).await;
        // The last answer at tick 10; pings 11 and 12 go unanswered; at tick 13
        // the silence is the timeout.
        assert_eq!(pings, 12);
        assert_eq!(silent_for, HANG);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_from_the_start_is_hung_after_the_timeout() {
        let start = Instant::now();
        let mut live = Liveness::new(HANG, EVERY, start);
        let (pings, silent_for) = run(&mut live, |_| false).await;
        assert_eq!(pings, 2, "pings at 1 s and 2 s, the verdict at 3 s");
        assert_eq!(silent_for, HANG);
        assert_eq!(Instant::now() - start, HANG);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_answer_counts_and_an_unsent_sequence_does_not() {
        let mut live = Liveness::new(HANG, EVERY, Instant::now());
        advance(EVERY).await;
        assert_eq!(live.tick(Instant::now()), Verdict::Ping(1));
        advance(EVERY).await;
        assert_eq!(live.tick(Instant::now()), Verdict::Ping(2));
        // A forged or stale answer to a ping never sent does not keep it alive.
        live.answered(99, Instant::now());
        live.answered(0, Instant::now());
        advance(EVERY).await;
        assert!(matches!(live.tick(Instant::now()), Verdict::Hung { .. }));

        let mut live = Liveness::new(HANG, EVERY, Instant::now());
        advance(EVERY).await;
        assert_eq!(live.tick(Instant::now()), Verdict::Ping(1));
        advance(EVERY).await;
        assert_eq!(live.tick(Instant::now()), Verdict::Ping(2));
        advance(EVERY).await;
        // The answer to the first ping arrives late: still alive.
        live.answered(1, Instant::now());
        assert_eq!(live.tick(Instant::now()), Verdict::Ping(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_shorter_than_two_intervals_is_raised_to_that() {
        let start = Instant::now();
        let mut live = Liveness::new(Duration::from_millis(500), EVERY, start);
        let (pings, silent_for) = run(&mut live, |_| false).await;
        assert_eq!((pings, silent_for), (1, 2 * EVERY));
        // An answered process is never judged at its first tick.
        let mut live = Liveness::new(Duration::from_millis(500), EVERY, Instant::now());
        let (pings, _) = run(&mut live, |seq| seq <= 3).await;
        assert_eq!(pings, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_master_that_was_itself_stalled_does_not_blame_the_child() {
        let mut live = Liveness::new(HANG, EVERY, Instant::now());
        advance(EVERY).await;
        assert_eq!(live.tick(Instant::now()), Verdict::Ping(1));
        // The master did not tick for 10 s (it was stopped itself).
        advance(Duration::from_secs(10)).await;
        assert_eq!(live.tick(Instant::now()), Verdict::Ping(2));
        // Then the child stays silent: hung a full timeout after the master resumed.
        let (_, silent_for) = run(&mut live, |_| false).await;
        assert_eq!(silent_for, HANG);
    }
}
