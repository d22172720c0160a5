//! The router's unit tests: routing, requests, links and back-pressure
//! against slots whose processes are only queues.

use super::*;
use crate::ipc::FromChild;

/// The supervised slots, all ready, with their queues (no processes).
struct Fixture {
    inner: crate::supervisor::testing::Fixture,
    now: Instant,
}

impl Fixture {
    /// The agent and `workers` workers, each with a data queue of `capacity` messages.
    fn new(workers: u32, capacity: usize) -> Self {
        Fixture { inner: crate::supervisor::testing::Fixture::with_capacity(workers, capacity), now: Instant::now() }
    }

    fn peers(&self) -> Peers<'_> {
        Peers { slots: &self.inner.slots, stopping: false }
    }

    fn slot(&self, id: SlotId) -> &Slot {
        self.inner.slots.get(id).unwrap()
    }

    fn agent_key(&self) -> ProcKey {
        self.inner.key(SlotId::Agent)
    }

    fn agent_sender(&self) -> Origin {
        self.slot(SlotId::Agent).proc.as_ref().unwrap().sender()
    }

    fn worker_key(&self, id: WorkerId) -> ProcKey {
        self.inner.key(SlotId::Worker(id))
    }

    fn worker_pid(&self, id: WorkerId) -> u32 {
        self.slot(SlotId::Worker(id)).proc.as_ref().unwrap().pid
    }

    fn worker_sender(&self, id: WorkerId) -> Origin {
        self.slot(SlotId::Worker(id)).proc.as_ref().unwrap().sender()
    }

    /// The worker died: its slot is empty (the master takes the process out first).
    fn kill_worker(&mut self, id: WorkerId) -> ProcKey {
        let slot = self.inner.slots.get_mut(SlotId::Worker(id)).unwrap();
        slot.state = ProcessState::BackingOff;
        slot.proc.take().unwrap().key
    }

    /// Fills the data queue of the worker to the brim.
    fn fill_worker_queue(&self, id: WorkerId) {
        let proc = self.slot(SlotId::Worker(id)).proc.as_ref().unwrap();
        while proc.data.try_send(ToChild::ClusterReady).is_ok() {}
    }
}

fn request(to: Target, deadline_ms: u64) -> Op {
    Op::Request { to, topic: "ping".into(), payload: Bytes::from_static(b"?"), deadline_ms }
}

const MASTER: Origin = Origin::Master { pid: 1 };

/// The request id of the delivery in `action`, which must be one to `to`.
fn delivered_request(action: &Action, to: ProcKey) -> u64 {
    match action {
        Action::Data { to: k, msg: ToChild::Deliver(Delivery { topic, request: Some(id), .. }) } if *k == to => {
            assert_eq!(topic, "ping");
            *id
        }
        other => panic!("expected a request delivered to {to:?}, got {other:?}"),
    }
}

fn refusal(actions: Vec<Action>) -> (ProcKey, u64, Refusal) {
    match <[Action; 1]>::try_from(actions) {
        Ok([Action::Control { to, msg: ToChild::Outcome { id, outcome: Outcome::Refused(r) } }]) => (to, id, r),
        other => panic!("expected one refusal, got {other:?}"),
    }
}

#[test]
fn a_request_is_routed_to_its_target_and_the_reply_back_to_the_requester() {
    let f = Fixture::new(2, 4);
    let mut router = Router::default();
    let (w1, agent) = (f.worker_key(1), f.agent_key());
    let responder = Responder::Remote { key: w1, id: 7 };
    let actions = router.on_op(f.peers(), f.now, f.worker_sender(1), Some(w1), request(Target::Agent, 1000), responder);
    assert_eq!(actions.len(), 1, "{actions:?}");
    let id = delivered_request(&actions[0], agent);
    match &actions[0] {
        Action::Data { msg: ToChild::Deliver(d), .. } => assert_eq!(d.from, f.worker_sender(1)),
        _ => unreachable!(),
    }

    // Only the asked process may answer.
    assert!(router.on_reply(Some(f.worker_key(2)), id, Ok(Bytes::from_static(b"forged"))).is_empty());
    let actions = router.on_reply(Some(agent), id, Ok(Bytes::from_static(b"pong")));
    match <[Action; 1]>::try_from(actions) {
        Ok([Action::Control { to, msg: ToChild::Outcome { id: 7, outcome: Outcome::Reply(Ok(b)) } }]) => {
            assert_eq!(to, w1);
            assert_eq!(&b[..], b"pong");
        }
        other => panic!("expected the reply for worker 1, got {other:?}"),
    }
    // Answered once: a second reply, and the deadline, find nothing.
    assert!(router.on_reply(Some(agent), id, Ok(Bytes::new())).is_empty());
    assert!(router.on_tick(f.now + Duration::from_secs(60)).is_empty());
    let counts = router.counts();
    assert_eq!((counts.request, counts.reply, counts.send), (1, 3, 0));
}

#[test]
fn a_request_to_the_master_is_delivered_locally_and_answered_locally() {
    let f = Fixture::new(1, 4);
    let mut router = Router::default();
    let (tx, mut rx) = oneshot::channel();
    let actions = router.on_op(f.peers(), f.now, MASTER, None, request(Target::Master, 1000), Responder::Local(tx));
    let id = match <[Action; 1]>::try_from(actions) {
        Ok([Action::Deliver(Delivery { request: Some(id), from: MASTER, .. })]) => id,
        other => panic!("expected a local delivery, got {other:?}"),
    };
    let actions = router.on_reply(None, id, Ok(Bytes::from_static(b"me")));
    match <[Action; 1]>::try_from(actions) {
        Ok([Action::Answer { reply, outcome }]) => reply.send(outcome).unwrap(),
        other => panic!("expected a local answer, got {other:?}"),
    }
    assert!(matches!(rx.try_recv(), Ok(Outcome::Reply(Ok(b))) if &b[..] == b"me"));
}

#[test]
fn requests_to_unknown_dead_or_full_targets_are_refused_with_the_typed_error() {
    let mut f = Fixture::new(2, 1);
    let mut router = Router::default();
    let agent = f.agent_key();
    let from = f.agent_sender();
    let mut ask = |f: &Fixture, to: Target, id: u64| {
        router.on_op(
            f.peers(),
            f.now,
            from.clone(),
            Some(agent),
            request(to, 1000),
            Responder::Remote { key: agent, id },
        )
    };

    let (to, id, r) = refusal(ask(&f, Target::Worker(9), 1));
    assert_eq!((to, id), (agent, 1));
    assert!(matches!(r, Refusal::NoSuchWorker { id: 9, workers: 2 }), "{r:?}");

    f.kill_worker(1);
    let (_, id, r) = refusal(ask(&f, Target::Worker(1), 2));
    assert_eq!(id, 2);
    assert!(
        matches!(&r, Refusal::NotRunning { target, state } if target == "worker 1" && state == "backing off"),
        "{r:?}"
    );

    f.fill_worker_queue(2);
    let (_, id, r) = refusal(ask(&f, Target::Worker(2), 3));
    assert_eq!(id, 3);
    assert!(matches!(&r, Refusal::QueueFull { target } if target == "worker 2"), "{r:?}");

    // A plain send to a full queue is refused the same way.
    let send = Op::Send { to: Target::Worker(2), topic: "t".into(), payload: Bytes::new() };
    let actions = router.on_op(f.peers(), f.now, from, Some(agent), send, Responder::Remote { key: agent, id: 4 });
    assert!(matches!(refusal(actions).2, Refusal::QueueFull { .. }));

    // Nothing refused is pending: no deadline fires later.
    assert!(router.on_tick(f.now + Duration::from_secs(60)).is_empty());
}

#[test]
fn a_fan_out_takes_the_room_it_plans_and_skips_the_sender() {
    let f = Fixture::new(3, 1);
    f.fill_worker_queue(3);
    let mut router = Router::default();
    let w1 = f.worker_key(1);
    let send = Op::Send { to: Target::All, topic: "t".into(), payload: Bytes::from_static(b"x") };
    let actions =
        router.on_op(f.peers(), f.now, f.worker_sender(1), Some(w1), send, Responder::Remote { key: w1, id: 1 });
    // The master, the agent and worker 2; worker 3's queue is full; not worker 1 itself.
    let targets: Vec<Option<ProcKey>> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(_) => Some(None),
            Action::Data { to, msg: ToChild::Deliver(_) } => Some(Some(*to)),
            _ => None,
        })
        .collect();
    assert_eq!(targets, vec![None, Some(f.agent_key()), Some(f.worker_key(2))]);
    match actions.last() {
        Some(Action::Control { to, msg: ToChild::Outcome { id: 1, outcome } }) => {
            assert_eq!(*to, w1);
            assert!(matches!(outcome, Outcome::Sent { count: 3, worker: None }), "{outcome:?}");
        }
        other => panic!("expected the acknowledgement, got {other:?}"),
    }
}

#[test]
fn a_request_whose_deadline_passes_is_answered_deadline_exceeded() {
    let f = Fixture::new(1, 4);
    let mut router = Router::default();
    let (tx, mut rx) = oneshot::channel();
    let actions = router.on_op(f.peers(), f.now, MASTER, None, request(Target::Worker(1), 500), Responder::Local(tx));
    let id = delivered_request(&actions[0], f.worker_key(1));

    assert!(router.on_tick(f.now + Duration::from_millis(499)).is_empty(), "not yet");
    let actions = router.on_tick(f.now + Duration::from_millis(500));
    match <[Action; 1]>::try_from(actions) {
        Ok([Action::Answer { reply, outcome }]) => reply.send(outcome).unwrap(),
        other => panic!("expected the deadline's answer, got {other:?}"),
    }
    match rx.try_recv() {
        Ok(Outcome::Refused(Refusal::DeadlineExceeded { target, deadline_ms: 500 })) => {
            assert_eq!(target, "worker 1")
        }
        other => panic!("{other:?}"),
    }
    // The late reply finds nothing to answer.
    assert!(router.on_reply(Some(f.worker_key(1)), id, Ok(Bytes::new())).is_empty());
}

/// Opens a link from worker `id`; returns its id.
fn open_link(router: &mut Router, f: &Fixture, id: WorkerId) -> LinkId {
    let key = f.worker_key(id);
    let actions =
        router.on_op(f.peers(), f.now, f.worker_sender(id), Some(key), Op::OpenLink, Responder::Remote { key, id: 1 });
    match <[Action; 2]>::try_from(actions) {
        Ok(
            [
                Action::Data { to: agent, msg: ToChild::IncomingLink { link, worker_id, pid } },
                Action::Control { to, msg: ToChild::Outcome { id: 1, outcome: Outcome::LinkOpened { link: opened } } },
            ],
        ) => {
            assert_eq!((agent, to, worker_id, link), (f.agent_key(), key, id, opened));
            assert_eq!(pid, f.worker_pid(id));
            link
        }
        other => panic!("expected a link opened, got {other:?}"),
    }
}

#[test]
fn a_links_frames_and_credits_are_relayed_between_its_ends() {
    let f = Fixture::new(2, 2);
    let mut router = Router::default();
    let (w1, agent) = (f.worker_key(1), f.agent_key());
    let link = open_link(&mut router, &f, 1);

    let actions = router.on_link_frame(f.peers(), w1, link, Bytes::from_static(b"f1"));
    assert!(
        matches!(&actions[..], [Action::Data { to, msg: ToChild::LinkFrame { link: l, frame } }]
        if *to == agent && *l == link && &frame[..] == b"f1"),
        "{actions:?}"
    );
    let actions = router.on_link_credit(f.peers(), agent, link, 5);
    assert!(
        matches!(&actions[..], [Action::Data { to, msg: ToChild::LinkCredit { credit: 5, .. } }] if *to == w1),
        "{actions:?}"
    );
    // Not an end of the link: ignored.
    assert!(router.on_link_frame(f.peers(), f.worker_key(2), link, Bytes::new()).is_empty());
    assert_eq!(router.counts().link_frame, 2);

    // With worker 1's data queue full, credit goes on its control queue (never lost)...
    f.fill_worker_queue(1);
    let actions = router.on_link_credit(f.peers(), agent, link, 3);
    assert!(
        matches!(&actions[..], [Action::Control { to, msg: ToChild::LinkCredit { credit: 3, .. } }] if *to == w1),
        "{actions:?}"
    );
    // ...but a frame closes the link: both ends are told, the full one on its control queue.
    let actions = router.on_link_frame(f.peers(), agent, link, Bytes::new());
    match <[Action; 2]>::try_from(actions) {
        Ok(
            [
                Action::Control { to: a, msg: ToChild::LinkClosed { reason: r1, .. } },
                Action::Data { to: b, msg: ToChild::LinkClosed { reason: r2, .. } },
            ],
        ) => {
            assert_eq!((a, b), (w1, agent));
            assert_eq!((r1.as_str(), r2.as_str()), ("relay queue full", "relay queue full"));
        }
        other => panic!("expected the link closed, got {other:?}"),
    }
    assert!(router.on_link_frame(f.peers(), w1, link, Bytes::new()).is_empty(), "the link is gone");
}

#[test]
fn no_links_open_while_stopping_or_while_the_agent_is_not_ready() {
    let mut f = Fixture::new(1, 2);
    let mut router = Router::default();
    let w1 = f.worker_key(1);
    let mut peers = f.peers();
    peers.stopping = true;
    let actions =
        router.on_op(peers, f.now, f.worker_sender(1), Some(w1), Op::OpenLink, Responder::Remote { key: w1, id: 1 });
    assert!(matches!(refusal(actions).2, Refusal::ShuttingDown));
    f.inner.slots.get_mut(SlotId::Agent).unwrap().state = ProcessState::Starting;
    let actions = router.on_op(
        f.peers(),
        f.now,
        f.worker_sender(1),
        Some(w1),
        Op::OpenLink,
        Responder::Remote { key: w1, id: 2 },
    );
    assert!(matches!(refusal(actions).2, Refusal::AgentUnavailable { state } if state == "starting"));
}

#[test]
fn a_child_gone_fails_what_it_was_asked_forgets_what_it_asked_and_closes_its_links() {
    let mut f = Fixture::new(2, 4);
    let mut router = Router::default();
    let (w1, w2, agent) = (f.worker_key(1), f.worker_key(2), f.agent_key());
    let link = open_link(&mut router, &f, 1);
    // The master asks worker 1; worker 1 asks worker 2.
    let (tx, mut rx) = oneshot::channel();
    router.on_op(f.peers(), f.now, MASTER, None, request(Target::Worker(1), 1000), Responder::Local(tx));
    let actions = router.on_op(
        f.peers(),
        f.now,
        f.worker_sender(1),
        Some(w1),
        request(Target::Worker(2), 1000),
        Responder::Remote { key: w1, id: 9 },
    );
    let asked_by_w1 = delivered_request(&actions[0], w2);

    assert_eq!(f.kill_worker(1), w1);
    let actions = router.on_gone(f.peers(), w1);
    assert_eq!(actions.len(), 2, "{actions:?}");
    for action in actions {
        match action {
            Action::Answer { reply, outcome } => reply.send(outcome).unwrap(),
            Action::Data { to, msg: ToChild::LinkClosed { link: l, reason } } => {
                assert_eq!((to, l, reason.as_str()), (agent, link, "worker 1 exited"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(rx.try_recv(), Ok(Outcome::Refused(Refusal::TargetExited { target })) if target == "worker 1"));
    // Worker 2's late reply and the deadline find nothing; the link is gone.
    assert!(router.on_reply(Some(w2), asked_by_w1, Ok(Bytes::new())).is_empty());
    assert!(router.on_tick(f.now + Duration::from_secs(60)).is_empty());
    assert!(router.on_link_frame(f.peers(), agent, link, Bytes::new()).is_empty());
}

#[test]
fn one_step_counts_the_room_its_own_messages_take() {
    // The agent's data queue has room for one message.
    let mut f = Fixture::new(1, 1);
    let mut router = Router::default();
    let (first, second) = (open_link(&mut router, &f, 1), open_link(&mut router, &f, 1));
    let w1 = f.kill_worker(1);
    let mut closed: Vec<(bool, LinkId)> = router
        .on_gone(f.peers(), w1)
        .into_iter()
        .map(|a| match a {
            Action::Data { msg: ToChild::LinkClosed { link, .. }, .. } => (true, link),
            Action::Control { msg: ToChild::LinkClosed { link, .. }, .. } => (false, link),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    closed.sort_by_key(|&(_, link)| link);
    // Behind the frames for one link; the other, with the queue now full, ahead of them.
    assert_eq!(closed.iter().map(|&(_, l)| l).collect::<Vec<_>>(), vec![first, second]);
    assert_eq!(closed.iter().filter(|&&(data, _)| data).count(), 1, "{closed:?}");
}

#[test]
fn the_fast_path_relays_a_links_frames_and_credits_and_leaves_the_rest_to_the_loop() {
    let f = Fixture::new(2, 2);
    let mut router = Router::default();
    let relay = router.relay();
    let (w1, w2, agent) = (f.worker_key(1), f.worker_key(2), f.agent_key());
    let link = open_link(&mut router, &f, 1);
    let other = open_link(&mut router, &f, 2);
    let room = |id: SlotId| f.slot(id).proc.as_ref().unwrap().data.capacity();
    let frame = |bytes: &'static [u8]| FromChild::LinkFrame { link, frame: Bytes::from_static(bytes) };

    relay.forward(w1, frame(b"f1")).unwrap();
    assert_eq!(room(SlotId::Agent), 1);
    relay.forward(agent, FromChild::LinkCredit { link, credit: 4 }).unwrap();
    assert_eq!(room(SlotId::Worker(1)), 1);
    assert_eq!(router.counts().link_frame, 1, "a credit is no frame");

    // Not an end of the link, an unknown link, no link message: given back untouched.
    assert!(matches!(relay.forward(w2, frame(b"x")), Err(FromChild::LinkFrame { frame, .. }) if &frame[..] == b"x"));
    let unknown = FromChild::LinkCredit { link: other + 1, credit: 1 };
    assert!(matches!(relay.forward(w1, unknown), Err(FromChild::LinkCredit { credit: 1, .. })));
    assert!(matches!(relay.forward(w1, FromChild::Pong { seq: 3 }), Err(FromChild::Pong { seq: 3 })));

    // A closed link leaves the fast path.
    router.on_link_close(f.peers(), w2, other);
    let late = FromChild::LinkFrame { link: other, frame: Bytes::new() };
    assert!(relay.forward(w2, late).is_err());
    assert_eq!(room(SlotId::Agent), 1, "nothing relayed for the closed link");

    // The agent's queue is full: the frame goes to the loop, and so does every
    // later message of the link (behind it), even with room on the other side.
    relay.forward(w1, frame(b"f2")).unwrap();
    assert_eq!(room(SlotId::Agent), 0);
    assert!(matches!(relay.forward(w1, frame(b"f3")), Err(FromChild::LinkFrame { frame, .. }) if &frame[..] == b"f3"));
    assert!(relay.forward(agent, FromChild::LinkCredit { link, credit: 1 }).is_err());
    assert_eq!(room(SlotId::Worker(1)), 1, "nothing relayed");
    assert_eq!(router.counts().link_frame, 2);
}
