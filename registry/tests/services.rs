//! The service registry: registrations, leases, discovery and service watches.

mod common;

use std::time::Duration;

use common::{LIMIT, SETTLE, next, start};
use tandem_registry::{Config, Instance, RegistryClient, ServiceEvent};
use tandem_testkit::{eventually, within};

fn leave(service: &str, id: &str) -> ServiceEvent {
    ServiceEvent::Leave { service: service.into(), id: id.into() }
}

#[tokio::test]
async fn a_service_watch_starts_with_the_current_instances_then_sees_joins_and_leaves() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let a = RegistryClient::connect(server.local_addr()).await.unwrap();
        let b = RegistryClient::connect(server.local_addr()).await.unwrap();
        let one = Instance::new("billing", "b1", "10.0.0.1:80").with_metadata("zone", "a");
        let two = Instance::new("billing", "b2", "10.0.0.2:80");
        let reg_one = a.register(one.clone(), Duration::from_secs(30)).await.unwrap();
        let _other = a.register(Instance::new("search", "s1", "10.0.0.9:80"), Duration::from_secs(30)).await.unwrap();

        let mut watch = b.watch_service("billing").await.unwrap();
        assert_eq!(next(&mut watch).await.unwrap(), ServiceEvent::Join(one.clone()));
        let reg_two = b.register(two.clone(), Duration::from_secs(30)).await.unwrap();
        assert_eq!(next(&mut watch).await.unwrap(), ServiceEvent::Join(two.clone()));
        assert_eq!(b.discover("billing").await.unwrap(), vec![one.clone(), two.clone()]);
        assert_eq!(b.discover("search").await.unwrap().len(), 1);
        assert_eq!(b.discover("nothing").await.unwrap(), vec![]);

        reg_one.deregister().await.unwrap();
        assert_eq!(next(&mut watch).await.unwrap(), leave("billing", "b1"));
        drop(reg_two);
        assert_eq!(next(&mut watch).await.unwrap(), leave("billing", "b2"));
        assert_eq!(b.discover("billing").await.unwrap(), vec![]);
        assert_eq!(server.stats().instances, 1);
    })
    .await
}

#[tokio::test]
async fn closing_the_registering_connection_removes_its_instances() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let owner = RegistryClient::connect(server.local_addr()).await.unwrap();
        let observer = RegistryClient::connect(server.local_addr()).await.unwrap();
        let _registration =
            owner.register(Instance::new("billing", "b1", "a:1"), Duration::from_secs(30)).await.unwrap();
        let mut watch = observer.watch_service("billing").await.unwrap();
        assert!(matches!(next(&mut watch).await.unwrap(), ServiceEvent::Join(_)));

        // The registration is still alive, but its connection goes away.
        owner.close();
        assert_eq!(next(&mut watch).await.unwrap(), leave("billing", "b1"));
        assert_eq!(observer.discover("billing").await.unwrap(), vec![]);
        let stats = observer.stats().await.unwrap();
        assert_eq!((stats.instances, stats.connections), (0, 0));
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn the_keepalive_task_holds_the_lease_for_many_ttls() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let owner = RegistryClient::connect(server.local_addr()).await.unwrap();
        let observer = RegistryClient::connect(server.local_addr()).await.unwrap();
        let ttl = Duration::from_secs(1);
        let registration = owner.register(Instance::new("billing", "b1", "a:1"), ttl).await.unwrap();
        assert_eq!(registration.ttl(), ttl);

        // Ten TTLs of (paused, auto-advanced) time: the lease is renewed every TTL / 3.
        tokio::time::sleep(ttl * 10).await;
        assert_eq!(observer.discover("billing").await.unwrap().len(), 1);
        assert_eq!(server.stats().instances, 1);

        registration.deregister().await.unwrap();
        assert_eq!(observer.discover("billing").await.unwrap(), vec![]);
    })
    .await
}

#[tokio::test]
async fn a_later_registration_of_the_same_id_replaces_the_earlier_one() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let first = RegistryClient::connect(server.local_addr()).await.unwrap();
        let second = RegistryClient::connect(server.local_addr()).await.unwrap();
        let old = first.register(Instance::new("billing", "b1", "old:1"), Duration::from_secs(30)).await.unwrap();
        let _new = second.register(Instance::new("billing", "b1", "new:1"), Duration::from_secs(30)).await.unwrap();
        let found = second.discover("billing").await.unwrap();
        assert_eq!(found.iter().map(|i| i.address.as_str()).collect::<Vec<_>>(), vec!["new:1"]);
        // The replaced registration's lease is gone: deregistering it is refused and changes nothing.
        let refused = old.deregister().await.unwrap_err();
        assert_eq!(refused.remote().map(|e| e.code.as_str()), Some("unknown_lease"));
        first.close();
        eventually(SETTLE, "the first connection is gone", || async { server.stats().connections == 1 }).await;
        assert_eq!(second.discover("billing").await.unwrap().len(), 1);
    })
    .await
}

#[tokio::test]
async fn bad_registrations_are_refused_clearly() {
    within(LIMIT, async {
        let server = start(Config::default()).await;
        let client = RegistryClient::connect(server.local_addr()).await.unwrap();
        let code = |e: tandem_registry::Error| e.remote().map(|r| r.code.clone()).unwrap_or_default();
        let short = client.register(Instance::new("s", "i", "a"), Duration::from_millis(1)).await.unwrap_err();
        assert_eq!(code(short), "bad_ttl");
        let empty = client.register(Instance::new("", "i", "a"), Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(code(empty), "empty_name");
        let huge = Instance::new("s", "i", "a").with_metadata("blob", "x".repeat(2 * 1024 * 1024));
        let huge = client.register(huge, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(code(huge), "instance_too_large");
        assert_eq!(client.stats().await.unwrap().instances, 0);
    })
    .await
}
