//! The Redis adapter over TLS with a client certificate and an ACL user,
//! against a real redis-server that speaks TLS only; the certificates are made
//! by the test. Wrong credentials are refused at once, typed, and not retried.
#![cfg(feature = "redis")]

#[path = "pki/mod.rs"]
mod pki;
mod redis_support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use futures::StreamExt;
use pki::Pki;
use redis_support::{Redis, within};
use tandem::protocol::UpstreamState;
use tandem::redis_upstream::{AUTH, RedisSecurity, RedisUpstream};
use tandem::registry_upstream::{ConfigApi, ConfigRequest, ConfigResponse};
use tandem::{Connection, ErrorKind, Leader, UnixConnector, Upstream};

const LIMIT: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(10);

async fn secured(pki: &Pki) -> Redis {
    let path = |p: std::path::PathBuf| p.to_str().expect("a UTF-8 temp path").to_owned();
    let (cert, key, ca) = (path(pki.server_cert()), path(pki.server_key()), path(pki.ca()));
    let (client_cert, client_key) = (path(pki.client_cert()), path(pki.client_key()));
    #[rustfmt::skip]
    let server = [
        "--tls-cert-file", &cert, "--tls-key-file", &key, "--tls-ca-cert-file", &ca, "--tls-auth-clients", "yes",
        "--user", "default", "off", "--user", "app", "on", ">app-pw", "~*", "&*", "+@all",
    ];
    #[rustfmt::skip]
    let cli = [
        "--tls", "--cacert", &ca, "--cert", &client_cert, "--key", &client_key,
        "--user", "app", "--pass", "app-pw", "--no-auth-warning",
    ];
    Redis::tls(&server, &cli).await
}

fn security(pki: &Pki) -> RedisSecurity {
    RedisSecurity::from_files(Some(&pki.ca()), Some((&pki.client_cert(), &pki.client_key()))).unwrap()
}

#[tokio::test]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn rediss_with_a_client_certificate_and_an_acl_user_serves_calls_and_subscriptions() {
    within(LIMIT, async {
        let pki = Pki::new("app");
        let redis = secured(&pki).await;
        assert!(redis.url().starts_with("rediss://"));
        let upstream =
            RedisUpstream::connect_with(&redis.url(), security(&pki).credentials(Some("app".into()), "app-pw"))
                .await
                .expect("connects over TLS as app");
        let leader = Leader::builder()
            .channel_from::<ConfigApi, _>({
                let upstream = upstream.clone();
                async move { Ok(upstream) }
            })
            .start();
        let dir = tempfile::Builder::new().prefix("tandem-redis-tls").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = leader.bind_unix(dir.path().join("leader.sock")).unwrap();
        let connection = Connection::builder().channel::<ConfigApi>().connect(UnixConnector::new(&path)).spawn();
        let client = connection.client::<ConfigApi>();
        client.ready().await.unwrap();

        let put = client.invoke(ConfigRequest::Put("greeting".into(), "hello".into())).await.unwrap();
        assert_eq!(put, ConfigResponse::Revision(0));
        assert_eq!(redis.cli(&["get", "greeting"]), "hello");
        let mut sub = client.subscribe("greeting".into()).await.unwrap();
        let first = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
        assert_eq!(first.value.value.as_deref(), Some("hello"));
        redis.cli(&["set", "greeting", "over-tls"]);
        let next = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
        assert_eq!(next.value.value.as_deref(), Some("over-tls"));
        let health = Upstream::<ConfigApi>::health(&upstream).unwrap();
        assert_eq!(*health.borrow(), UpstreamState::Ready);
    })
    .await
}

#[tokio::test]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn a_wrong_password_or_none_is_refused_typed_and_not_retried() {
    within(LIMIT, async {
        let pki = Pki::new("app");
        let redis = secured(&pki).await;
        let wrong = RedisUpstream::connect_with(&redis.url(), security(&pki).credentials(Some("app".into()), "wrong"))
            .await
            .unwrap_err();
        assert_eq!((wrong.kind, &wrong.code), (ErrorKind::Rejected, &AUTH), "{wrong}");
        assert!(wrong.message.contains("refused the credentials"), "{wrong}");
        // No credentials: the default user is off, so Redis answers NOAUTH.
        let none = RedisUpstream::connect_with(&redis.url(), security(&pki)).await.unwrap_err();
        assert_eq!((none.kind, &none.code), (ErrorKind::Rejected, &AUTH), "{none}");
    })
    .await
}

#[tokio::test]
#[ignore = "needs redis-server: apt-get install redis-server"]
async fn tls_settings_with_a_plain_url_or_an_unreadable_pem_are_bad_requests() {
    within(LIMIT, async {
        let pki = Pki::new("app");
        let plain = format!("redis://127.0.0.1:{}", redis_support::free_port());
        let error = RedisUpstream::connect_with(&plain, security(&pki)).await.unwrap_err();
        assert_eq!(error.kind, ErrorKind::BadRequest, "{error}");
        assert!(error.message.contains("must be rediss://"), "{error}");
        let missing = pki.path("nope.pem");
        let error = RedisSecurity::from_files(Some(&missing), None).unwrap_err();
        assert_eq!(error.kind, ErrorKind::BadRequest, "{error}");
        assert!(error.message.contains("nope.pem"), "{error}");
        // Debug never shows the password.
        let shown = format!("{:?}", security(&pki).credentials(Some("app".into()), "s3cret"));
        assert!(shown.contains("app") && !shown.contains("s3cret"), "{shown}");
    })
    .await
}
