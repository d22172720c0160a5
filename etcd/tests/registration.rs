//! Lease-based registration against a real etcd: kept alive, renewed when the
//! lease is lost, gone when its owner dies, removed at once on deregister.

mod support;

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use support::{Etcd, within};
use tandem_etcd::{Config, EtcdClient, ServiceWatch};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(40);
const TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Instance {
    id: String,
    address: String,
}

fn instance(id: &str) -> Instance {
    Instance { id: id.into(), address: format!("10.0.0.1:{}", id.len()) }
}

async fn next_list(watch: &mut ServiceWatch<Instance>) -> Vec<String> {
    let list = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("no list in 5 s").unwrap();
    list.into_iter().map(|i| i.id).collect()
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn a_registration_is_kept_alive_renewed_and_gone_with_its_owner() {
    within(LIMIT, async {
        let etcd = Etcd::single().await;
        let observer = EtcdClient::connect(Config::new(etcd.endpoints())).await.unwrap();
        let mut lists = observer.watch_service::<Instance>("svc");
        assert_eq!(next_list(&mut lists).await, Vec::<String>::new());

        let owner = EtcdClient::connect(Config::new(etcd.endpoints())).await.unwrap();
        let registration = owner.register("svc", "a", &instance("a"), TTL).await.unwrap();
        assert_eq!(registration.key(), "/tandem/services/svc/a");
        assert_eq!(next_list(&mut lists).await, ["a"]);
        assert_eq!(observer.discover::<Instance>("svc").await.unwrap(), [instance("a")]);

        // Alive well past its ttl: the keep-alive works.
        let quiet = tokio::time::timeout(3 * TTL, lists.next()).await;
        assert!(quiet.is_err(), "the list changed while the owner lived: {quiet:?}");

        // Someone revokes the lease: the key goes, and comes back on a new lease.
        let old = registration.lease();
        let mut leases = registration.lease_changes();
        let mut admin = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
        admin.lease_revoke(old).await.unwrap();
        assert_eq!(next_list(&mut lists).await, Vec::<String>::new());
        assert_eq!(next_list(&mut lists).await, ["a"]);
        tokio::time::timeout(Duration::from_secs(5), leases.wait_for(|lease| *lease != old)).await.unwrap().unwrap();
        let renewed = registration.lease();
        assert_ne!(renewed, old);

        // Deregister: gone at once.
        let other = owner.register("svc", "b", &instance("b"), TTL).await.unwrap();
        assert_eq!(next_list(&mut lists).await, ["a", "b"]);
        let began = Instant::now();
        other.deregister().await.unwrap();
        assert_eq!(next_list(&mut lists).await, ["a"]);
        assert!(began.elapsed() < TTL, "deregister waited for the lease: {:?}", began.elapsed());

        // The owner dies (no keep-alive, no revoke): gone when its lease expires.
        let began = Instant::now();
        drop(registration);
        drop(owner);
        assert_eq!(next_list(&mut lists).await, Vec::<String>::new());
        assert!(began.elapsed() >= TTL / 2, "gone before the lease could expire: {:?}", began.elapsed());
        let ttl = admin.lease_time_to_live(renewed, None).await.unwrap().ttl();
        assert_eq!(ttl, -1, "the lease expired");
    })
    .await
}
