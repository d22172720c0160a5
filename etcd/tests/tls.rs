//! TLS and credentials against a real etcd that serves only TLS, requires
//! client certificates and has authentication enabled; the certificates are
//! made by the test.

#[path = "../../tests/pki/mod.rs"]
mod pki;
mod support;

use std::time::Duration;

use futures::StreamExt;
use pki::Pki;
use support::{Etcd, ServerTls, within};
use tandem_etcd::{Config, ConnectionState, Credentials, Error, EtcdClient, Keys, Start, Tls, WatchEvent};

const LIMIT: Duration = Duration::from_secs(60);

async fn secured() -> (Pki, Etcd) {
    let pki = Pki::new("app");
    let etcd =
        Etcd::single_tls(ServerTls { cert: pki.server_cert(), key: pki.server_key(), client_ca: pki.ca() }).await;
    // Users and roles, then auth on: `root` (required by etcd to enable auth)
    // and `app`, which may read and write under /app/ only.
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(pki.ca()).unwrap()))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(pki.client_cert()).unwrap(),
            std::fs::read(pki.client_key()).unwrap(),
        ));
    let options = etcd_client::ConnectOptions::new().with_tls(tls);
    let mut admin =
        etcd_client::Client::connect(etcd.endpoints(), Some(options)).await.expect("admin connects over TLS");
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("app", "app-pw", None).await.unwrap();
    admin.role_add("app-rw").await.unwrap();
    let permission = etcd_client::Permission::read_write("/app/").with_prefix();
    admin.role_grant_permission("app-rw", permission).await.unwrap();
    admin.user_grant_role("app", "app-rw").await.unwrap();
    admin.auth_enable().await.unwrap();
    (pki, etcd)
}

fn tls(pki: &Pki) -> Tls {
    Tls::from_files(&pki.ca(), Some((&pki.client_cert(), &pki.client_key()))).expect("PEM files")
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn a_client_with_tls_and_a_password_reads_writes_and_watches() {
    within(LIMIT, async {
        let (pki, etcd) = secured().await;
        let config =
            Config::new(etcd.endpoints()).with_tls(tls(&pki)).with_credentials(Credentials::new("app", "app-pw"));
        let client = EtcdClient::connect(config).await.expect("connects over TLS with a password");
        let mut watch = client.watch(Keys::prefix("/app/"), Start::Snapshot);
        let first = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap();
        assert!(matches!(first, WatchEvent::Snapshot(_)), "{first:?}");
        let written = client.put("/app/greeting", "hello").await.unwrap();
        let kv = client.get("/app/greeting").await.unwrap().unwrap();
        assert_eq!((kv.value_str().as_str(), kv.mod_revision), ("hello", written));
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap();
        assert!(matches!(&event, WatchEvent::Put(kv) if kv.value_str() == "hello"), "{event:?}");
        // The role allows /app/ only: anything else is etcd's refusal of the request, not of the client.
        let denied = client.put("/other", "x").await.unwrap_err();
        assert!(matches!(denied, Error::Refused(_)), "{denied:?}");
        assert!(matches!(*client.state().borrow(), ConnectionState::Connected { .. }));
    })
    .await;
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn a_wrong_password_is_refused_for_good_not_retried() {
    within(LIMIT, async {
        let (pki, etcd) = secured().await;
        let config =
            Config::new(etcd.endpoints()).with_tls(tls(&pki)).with_credentials(Credentials::new("app", "wrong"));
        let error = EtcdClient::connect(config.clone()).await.unwrap_err();
        assert!(matches!(error, Error::Unauthenticated { .. }), "{error:?}");
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("authentication failed"), "{error}");
        // A started client says so in its state, and every call fails the same way.
        let client = EtcdClient::start(config).unwrap();
        let mut state = client.state();
        let refused = state.wait_for(|s| matches!(s, ConnectionState::Refused { .. })).await.unwrap().clone();
        assert!(format!("{refused:?}").contains("authentication failed"), "{refused:?}");
        let call = client.get("/app/greeting").await.unwrap_err();
        assert!(matches!(call, Error::Unauthenticated { .. }), "{call:?}");
    })
    .await;
}

#[tokio::test]
#[ignore = "needs etcd: apt-get install etcd-server"]
async fn a_client_without_its_certificate_or_trusting_another_ca_is_unavailable_with_the_reason() {
    within(LIMIT, async {
        let (pki, etcd) = secured().await;
        let credentials = Credentials::new("app", "app-pw");
        let quick = |mut config: Config| {
            config.connect_timeout = Duration::from_secs(2);
            config
        };

        // No client certificate: the member ends the handshake.
        let config = quick(Config::new(etcd.endpoints()))
            .with_tls(Tls::from_files(&pki.ca(), None).unwrap())
            .with_credentials(credentials.clone());
        let error = EtcdClient::connect(config).await.unwrap_err();
        assert!(error.is_unavailable(), "{error:?}");

        // The member's certificate is not signed by the CA this client trusts.
        let config = quick(Config::new(etcd.endpoints()))
            .with_tls(Tls::from_files(&pki.stranger_ca(), Some((&pki.client_cert(), &pki.client_key()))).unwrap())
            .with_credentials(credentials);
        let error = EtcdClient::connect(config).await.unwrap_err();
        assert!(error.is_unavailable(), "{error:?}");
        assert!(error.chain().contains("invalid peer certificate: UnknownIssuer"), "{}", error.chain());

        // An https endpoint without TLS settings cannot work: said at once.
        let error = EtcdClient::connect(Config::new(etcd.endpoints())).await.unwrap_err();
        assert!(matches!(error, Error::Config(_)), "{error:?}");
        assert!(error.to_string().contains("https but no TLS settings"), "{error}");
    })
    .await;
}
