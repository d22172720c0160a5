//! Certificates for the TLS tests, made fresh by each test: a CA, a server
//! certificate for `127.0.0.1` and `localhost`, and a client certificate, all
//! signed by the CA and written as PEM files into a temporary directory.
//!
//! Shared through `#[path]` by the etcd crate's tests and the root crate's
//! Redis tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// PEM files in a temporary directory, removed when dropped.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA with a server and a client certificate (the client's common
    /// name is `client_name`).
    pub fn new(client_name: &str) -> Pki {
        let dir = tempfile::Builder::new().prefix("tandem-pki").tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "tandem test CA");
        let ca = ca_params.self_signed(&ca_key).expect("self-signed CA");
        write(dir.path(), "ca.pem", &ca.pem());

        for (name, sans, common_name) in [
            ("server", vec!["127.0.0.1".to_string(), "localhost".to_string()], "127.0.0.1"),
            ("client", vec![client_name.to_string()], client_name),
        ] {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, common_name);
            let cert = params.signed_by(&key, &ca, &ca_key).expect("signed by the CA");
            write(dir.path(), &format!("{name}.pem"), &cert.pem());
            write(dir.path(), &format!("{name}-key.pem"), &key.serialize_pem());
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.path("server-key.pem")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.path("client-key.pem")
    }

    /// Another CA's certificate: a client that trusts only it must refuse the server.
    pub fn stranger_ca(&self) -> PathBuf {
        let path = self.path("stranger-ca.pem");
        if !path.exists() {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, "a stranger's CA");
            write(self.dir.path(), "stranger-ca.pem", &params.self_signed(&key).expect("self-signed").pem());
        }
        path
    }
}

fn write(dir: &Path, name: &str, pem: &str) {
    std::fs::write(dir.join(name), pem).unwrap_or_else(|e| panic!("write {name}: {e}"));
}
