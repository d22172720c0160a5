//! How a [`EtcdClient`](crate::EtcdClient) reaches etcd.

use std::time::Duration;

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

    /// The endpoints as URLs (`http://` added where no scheme was given).
    pub(crate) fn urls(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| if e.contains("://") { e.clone() } else { format!("http://{e}") }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_split_trimmed_and_given_a_scheme() {
        let config = Config::from_list(" http://127.0.0.1:2379, 127.0.0.1:2380 ,,");
        assert_eq!(config.endpoints, ["http://127.0.0.1:2379", "127.0.0.1:2380"]);
        assert_eq!(config.urls(), ["http://127.0.0.1:2379", "http://127.0.0.1:2380"]);
    }
}
