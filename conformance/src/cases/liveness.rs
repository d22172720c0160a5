//! The cases about a link's life: upstream states, pings and heartbeats, the
//! peer timeout, epochs across leaders, and malformed frames.

use super::*;

impl Ctx {
    pub(super) async fn upstream_status(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let down = RemoteError::unavailable("connection refused").with_code(ErrorCode::upstream("connect"));
        conn.send(status(CHANNEL, UpstreamState::Down(down))).await?;
        self.await_state("Down", Some("connect")).await?;
        conn.send(status(CHANNEL, UpstreamState::Starting)).await?;
        self.await_state("Starting", None).await?;
        conn.send(status(CHANNEL, UpstreamState::Ready)).await?;
        self.await_state("Ready", None).await
    }

    pub(super) async fn ping(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        for nonce in [0xdead_beef_u64, u64::MAX, 7] {
            conn.send(Frame::Ping(nonce)).await?;
            loop {
                match conn.recv_raw(self.step).await? {
                    Some(Frame::Pong(got)) if got == nonce => break,
                    Some(Frame::Pong(got)) => return Err(format!("Pong({got}) answers Ping({nonce})")),
                    Some(Frame::Ping(theirs)) => conn.send(Frame::Pong(theirs)).await?,
                    Some(other) => return Err(format!("expected Pong({nonce}), got {other:?}")),
                    None => return Err("the follower closed the connection".into()),
                }
            }
        }
        Ok(())
    }

    pub(super) async fn heartbeat(&mut self) -> Outcome {
        let (mut conn, _) = self.connect(1, 100, json!({})).await?;
        let mut nonces = Vec::new();
        while nonces.len() < 3 {
            match conn.recv_raw(Duration::from_secs(2)).await? {
                Some(Frame::Ping(nonce)) => {
                    nonces.push(nonce);
                    conn.send(Frame::Pong(nonce)).await?;
                }
                Some(Frame::Pong(_)) => {}
                Some(other) => return Err(format!("expected Ping, got {other:?}")),
                None => return Err("the follower closed the connection".into()),
            }
        }
        Ok(())
    }

    pub(super) async fn peer_timeout(&mut self) -> Outcome {
        let peer_timeout = Duration::from_millis(600);
        // A leader that announced a heartbeat far longer than the peer timeout:
        // the follower still checks for silence within its own timeout.
        let (mut conn, _) =
            self.connect(1, 60_000, json!({ "peer_timeout_ms": peer_timeout.as_millis() as u64 })).await?;
        let (command, _) = self.start_invoke(&mut conn, "hang", 20_000).await?;
        let silent_since = Instant::now();
        // From now on the leader sends nothing, and answers no Ping.
        conn.expect_closed(peer_timeout * 4 + self.step).await?;
        let took = silent_since.elapsed();
        ensure!(took >= peer_timeout / 2, "the follower gave up after {} ms of silence", took.as_millis());
        let error = self.child.err(command, self.step).await?;
        ensure!(error_type(&error) == "LeaderLost", "the call in flight ended with {error}, expected LeaderLost");
        // The new leader pings (100 ms) and answers pings, so the 600 ms peer timeout keeps it.
        let (mut conn, _) = self.accept(2, 100).await?;
        self.await_connected_answering(&mut conn, 2).await?;
        self.round_trip(&mut conn, &[]).await
    }

    pub(super) async fn epochs(&mut self) -> Outcome {
        let (mut conn, _) = self.connect(5, QUIET_HEARTBEAT_MS, json!({})).await?;
        let (sub, subscribe) = self.start_subscribe(&mut conn, "db.url").await?;
        let key = subscribe.key.clone();
        let event = |epoch: u64, seq: u64, value: &str| {
            Frame::Event(tandem_protocol::Event {
                channel: CHANNEL.into(),
                key: key.clone(),
                epoch,
                seq,
                payload: msgpack(&json!(value)),
                cached: false,
            })
        };
        conn.send(Frame::Ack(Ack { id: subscribe.id, result: Ok(()) })).await?;
        conn.send(event(5, 3, "a")).await?;
        self.child.ok(sub, self.step).await?;
        self.expect_value(sub, "a", 5, 3, false).await?;

        // The leader leaves; a new one at a higher epoch.
        conn.send(Frame::Goodbye("leader shutting down".into())).await?;
        drop(conn);
        let (mut conn, _) = self.accept(7, QUIET_HEARTBEAT_MS).await?;
        let resubscribe = self.expect_subscribe(&mut conn, &key, Position { epoch: 5, seq: 3 }).await?;
        conn.send(Frame::Ack(Ack { id: resubscribe, result: Ok(()) })).await?;
        conn.send(event(7, 1, "b")).await?;
        self.expect_value(sub, "b", 7, 1, false).await?;
        drop(conn);

        // A leader of a lower epoch is refused: no Subscribe, the link closed.
        let mut stale = self.leader.accept(self.step).await?;
        let hello = stale.hello(self.step).await?;
        // The follower may close as soon as it reads the Welcome: a failed write of the Status is fine.
        let _ = stale.welcome(&hello, 6, QUIET_HEARTBEAT_MS).await;
        stale.expect_closed(self.step).await.map_err(|e| format!("after a Welcome at the lower epoch 6: {e}"))?;

        // The follower comes back; the epoch-7 leader again (same leader id) replays.
        let (mut conn, _) = self.accept(7, QUIET_HEARTBEAT_MS).await?;
        let resubscribe = self.expect_subscribe(&mut conn, &key, Position { epoch: 7, seq: 1 }).await?;
        conn.send(Frame::Ack(Ack { id: resubscribe, result: Ok(()) })).await?;
        conn.send(event(7, 1, "b")).await?; // already delivered
        conn.send(event(6, 9, "old")).await?; // older than delivered
        conn.send(event(7, 2, "c")).await?;
        self.expect_value(sub, "c", 7, 2, false).await?;
        let id = self.child.send(json!({ "op": "status", "channel": CHANNEL })).await?;
        let reply = self.child.ok(id, self.step).await?;
        ensure!(reply["epoch"] == json!(7), "status epoch is {}, expected 7", reply["epoch"]);
        Ok(())
    }

    pub(super) async fn expect_subscribe(
        &mut self,
        conn: &mut Conn,
        key: &Bytes,
        last_seen: Position,
    ) -> Result<u64, String> {
        match conn.recv(self.step).await? {
            Frame::Subscribe(s) if s.key == *key => {
                ensure!(
                    s.last_seen == Some(last_seen),
                    "the resubscribe has last_seen {:?}, expected {last_seen:?}",
                    s.last_seen
                );
                Ok(s.id)
            }
            other => Err(format!("expected a resubscribe of the key, got {other:?}")),
        }
    }

    pub(super) async fn malformed(&mut self) -> Outcome {
        let mut conn = self.connected().await?;
        let variants: [(&str, Vec<u8>); 8] = [
            ("garbage body", vec![0, 0, 0, 3, 0xc1, 0xc1, 0xc1]),
            ("unknown frame kind", b"\x00\x00\x00\x07\x81\xa5Bogus\x01".to_vec()),
            ("bytes after the value", b"\x00\x00\x00\x08\x81\xa4Ping\x07\x07".to_vec()),
            ("empty body", vec![0, 0, 0, 0]),
            ("a body that is not a map", b"\x00\x00\x00\x01\x07".to_vec()),
            (
                "wrong direction (Invoke from the leader)",
                b"\x00\x00\x00\x1b\x81\xa6Invoke\x95\x01\xa6config\xcd\x0b\xb8\xc2\xc4\x04\xa3get".to_vec(),
            ),
            ("length prefix over any limit", vec![0xff, 0xff, 0xff, 0xff, 0x81]),
            ("truncated frame", vec![0, 0, 0, 10, 0x81, 0xa4]),
        ];
        for (what, bytes) in variants {
            conn.send_raw(&bytes).await?;
            if what == "truncated frame" {
                conn.shutdown_write().await;
            }
            conn.expect_closed(self.step).await.map_err(|e| format!("after {what}: {e}"))?;
            ensure!(self.child.alive(), "the follower process exited after {what}");
            conn = self.accept(1, QUIET_HEARTBEAT_MS).await.map_err(|e| format!("reconnecting after {what}: {e}"))?.0;
        }
        self.await_connected(1).await?;
        self.round_trip(&mut conn, &[]).await
    }
}
