//! How a [`EtcdClient`](crate::EtcdClient) reaches etcd: the members, the
//! timeouts, TLS and credentials.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::Error;

/// The client's settings: the members to try, and how long to wait for them.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The members' client URLs (`http://127.0.0.1:2379`; a bare `host:port` gets
    /// `http://`). The client talks to one at a time, in this order, and moves on
    /// when the one in use fails. The default is empty: [`EtcdClient::connect`](crate::EtcdClient::connect)
    /// refuses an empty list.
    pub endpoints: Vec<String>,
    /// How long a member has to answer its first request before the client
    /// moves on to the next one. The default is 1 second.
    pub connect_timeout: Duration,
    /// The longest a call may take when its caller set no earlier deadline
    /// (see [`EtcdClient::until`](crate::EtcdClient::until)). The default is 5 seconds.
    pub request_timeout: Duration,
    /// How often an HTTP/2 ping checks the member in use, so one that stopped
    /// answering without closing the connection is noticed. The default is 2 seconds.
    pub keep_alive_interval: Duration,
    /// How long a ping may stay unanswered before the member counts as dead.
    /// The default is 2 seconds.
    pub keep_alive_timeout: Duration,
    /// The pause after a round in which no member answered; it doubles each
    /// round up to [`retry_max`](Config::retry_max). The default is 50 milliseconds.
    pub retry_initial: Duration,
    /// The longest pause between two rounds. The default is 1 second.
    pub retry_max: Duration,
    /// Where service instances live: `<services_prefix><service>/<id>`. The
    /// default is `/tandem/services/`.
    pub services_prefix: String,
    /// Events a [`Watch`](crate::Watch) buffers for a consumer that is behind;
    /// when full, the watch stops reading from etcd until the consumer catches
    /// up (nothing is dropped). The default is 256.
    pub watch_buffer: usize,
    /// TLS to the members (`https://` endpoints): the CA that signed their
    /// certificates, and this client's own certificate when etcd runs with
    /// `--client-cert-auth`. The default is none (plain `http://`).
    pub tls: Option<Tls>,
    /// The etcd user to authenticate as, when etcd runs with `auth enable`.
    /// The client gets a token at each connection and renews it when it
    /// expires. The default is none.
    pub credentials: Option<Credentials>,
}

/// TLS settings for the connection to etcd.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Tls {
    /// The PEM certificate(s) of the CA that signed the members' certificates.
    pub ca_pem: Vec<u8>,
    /// This client's PEM certificate and PEM private key, for members that
    /// require client certificates (`--client-cert-auth`). The default is none.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the members' certificates must carry, when it is not the
    /// endpoint's host. The default is the endpoint's host.
    pub domain: Option<String>,
}

impl Tls {
    /// Trust the members' certificates signed by this CA (PEM).
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Tls {
        Tls { ca_pem: ca_pem.into(), identity: None, domain: None }
    }

    /// Reads the CA and, when given, the client certificate and key, from PEM
    /// files. A file that cannot be read, or that holds no PEM block, is an
    /// [`Error::Config`] naming it.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Tls, Error> {
        let mut tls = Tls::new(read_pem(ca, "CA certificate")?);
        if let Some((cert, key)) = identity {
            tls.identity = Some((read_pem(cert, "client certificate")?, read_pem(key, "client key")?));
        }
        Ok(tls)
    }

    /// Also present this client certificate and key (PEM).
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Tls {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Check the members' certificates against this name instead of the host.
    pub fn domain(mut self, name: impl Into<String>) -> Tls {
        self.domain = Some(name.into());
        self
    }

    pub(crate) fn options(&self) -> etcd_client::TlsOptions {
        let mut options =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            options = options.identity(etcd_client::Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            options = options.domain_name(domain.clone());
        }
        options
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<certificate and key>"))
            .field("domain", &self.domain)
            .finish()
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::Config(format!("cannot read the {what} {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Error::Config(format!("the {what} {} holds no PEM block", path.display())));
    }
    Ok(bytes)
}

/// An etcd user and its password. `Debug` never shows the password.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: String,
}

impl Credentials {
    /// The user `user` with `password`.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials { user: user.into(), password: password.into() }
    }

    /// The user's name.
    pub fn user(&self) -> &str {
        &self.user
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<hidden>").finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoints: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(2),
            keep_alive_timeout: Duration::from_secs(2),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(1),
            services_prefix: "/tandem/services/".to_string(),
            watch_buffer: 256,
            tls: None,
            credentials: None,
        }
    }
}

impl Config {
    /// The default settings with these endpoints.
    pub fn new<E: Into<String>>(endpoints: impl IntoIterator<Item = E>) -> Self {
        Config { endpoints: endpoints.into_iter().map(Into::into).collect(), ..Config::default() }
    }

    /// The default settings with a comma-separated endpoint list
    /// (`http://10.0.0.1:2379,http://10.0.0.2:2379`); blanks are ignored.
    pub fn from_list(list: &str) -> Self {
        Config::new(list.split(',').map(str::trim).filter(|e| !e.is_empty()))
    }

    /// These settings, with TLS to the members.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// These settings, authenticating as this user.
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// The endpoints as URLs: `http://` (or `https://` with [`Config::tls`])
    /// added where no scheme was given. A scheme that contradicts the TLS
    /// setting is an [`Error::Config`]: `https://` without TLS settings would
    /// fail at every connection, and `http://` with them would send the
    /// credentials in the clear.
    pub(crate) fn urls(&self) -> Result<Vec<String>, Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| match e.split_once("://") {
                None => Ok(format!("{scheme}://{e}")),
                Some((given, _)) if given == scheme => Ok(e.clone()),
                Some(("https", _)) => Err(Error::Config(format!("{e} is https but no TLS settings are given"))),
                Some(("http", _)) => {
                    Err(Error::Config(format!("{e} is plain http but TLS settings are given: use https://")))
                }
                Some((other, _)) => Err(Error::Config(format!("{e}: unknown scheme {other:?} (http or https)"))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_split_trimmed_and_given_a_scheme() {
        let config = Config::from_list(" http://127.0.0.1:2379, 127.0.0.1:2380 ,,");
        assert_eq!(config.endpoints, ["http://127.0.0.1:2379", "127.0.0.1:2380"]);
        assert_eq!(config.urls().unwrap(), ["http://127.0.0.1:2379", "http://127.0.0.1:2380"]);
    }

    #[test]
    fn tls_makes_bare_endpoints_https_and_refuses_plain_http() {
        let tls = Tls::new(b"-----BEGIN CERTIFICATE-----".to_vec());
        let config = Config::from_list("127.0.0.1:2379,https://10.0.0.1:2379").with_tls(tls.clone());
        assert_eq!(config.urls().unwrap(), ["https://127.0.0.1:2379", "https://10.0.0.1:2379"]);
        let plain = Config::from_list("http://127.0.0.1:2379").with_tls(tls);
        assert!(plain.urls().unwrap_err().to_string().contains("plain http but TLS settings are given"));
        let no_tls = Config::from_list("https://127.0.0.1:2379");
        assert!(no_tls.urls().unwrap_err().to_string().contains("https but no TLS settings"));
        let odd = Config::from_list("unix://x");
        assert!(odd.urls().unwrap_err().to_string().contains("unknown scheme"));
    }

    #[test]
    fn debug_never_shows_the_password_or_the_key() {
        let config = Config::from_list("127.0.0.1:2379")
            .with_credentials(Credentials::new("app", "s3cret"))
            .with_tls(Tls::new(b"ca".to_vec()).identity(b"cert".to_vec(), b"PRIVATE KEY s3cret".to_vec()));
        let shown = format!("{config:?}");
        assert!(shown.contains("app") && !shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn pem_files_that_are_missing_or_not_pem_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let e = Tls::from_files(&missing, None).unwrap_err().to_string();
        assert!(e.contains("cannot read the CA certificate") && e.contains("ca.pem"), "{e}");
        std::fs::write(&missing, "not a certificate").unwrap();
        let e = Tls::from_files(&missing, None).unwrap_err().to_string();
        assert!(e.contains("holds no PEM block"), "{e}");
    }
}
