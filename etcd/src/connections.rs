//! Counting, from outside, the TCP connections a set of processes holds to
//! etcd — how a demo or a test checks that N followers cost one connection
//! (etcd itself does not report its client connections).
//!
//! ```text
//! /proc/<pid>/fd/*     -> socket:[inode]          the sockets each process holds
//! /proc/<pid>/net/tcp  -> inode, state, remote    ESTABLISHED (01) to an etcd address
//! ```
//!
//! Linux only; elsewhere the count fails with [`std::io::ErrorKind::Unsupported`].

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// The addresses of etcd endpoints given as URLs or `host:port`
/// (`http://127.0.0.1:2379` -> `127.0.0.1:2379`); names are resolved.
pub fn endpoint_addrs<E: AsRef<str>>(endpoints: &[E]) -> io::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for endpoint in endpoints {
        let endpoint = endpoint.as_ref();
        let authority = endpoint.split("://").last().unwrap_or(endpoint);
        let authority = authority.split('/').next().unwrap_or(authority);
        addrs.extend(authority.to_socket_addrs()?);
    }
    Ok(addrs)
}

/// How many distinct ESTABLISHED TCP connections the processes `pids` hold to
/// any of `remotes`. A process that has exited counts nothing.
pub fn established_connections(pids: &[u32], remotes: &[SocketAddr]) -> io::Result<usize> {
    if !cfg!(target_os = "linux") {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "counting connections needs Linux /proc"));
    }
    let mut counted = HashSet::new();
    for &pid in pids {
        let inodes = socket_inodes(pid)?;
        if inodes.is_empty() {
            continue;
        }
        for table in ["tcp", "tcp6"] {
            let text = match std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
                Ok(text) => text,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            for line in text.lines().skip(1) {
                let Some(entry) = Entry::parse(line) else { continue };
                if entry.established && inodes.contains(&entry.inode) && remotes.iter().any(|r| same(*r, entry.remote))
                {
                    counted.insert(entry.inode);
                }
            }
        }
    }
    Ok(counted.len())
}

/// The inodes of the sockets process `pid` has open (empty if it is gone).
fn socket_inodes(pid: u32) -> io::Result<HashSet<u64>> {
    let dir = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(dir) => dir,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(error) => return Err(error),
    };
    let mut inodes = HashSet::new();
    for fd in dir {
        // An fd closed while we read the directory is simply not counted.
        let Ok(fd) = fd else { continue };
        let Ok(target) = std::fs::read_link(fd.path()) else { continue };
        let target = target.to_string_lossy();
        if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']'))
            && let Ok(inode) = inode.parse()
        {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    a.port() == b.port() && canonical(a.ip()) == canonical(b.ip())
}

/// One line of `/proc/net/tcp{,6}`:
/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...`
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    remote: SocketAddr,
    established: bool,
    inode: u64,
}

impl Entry {
    fn parse(line: &str) -> Option<Entry> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let remote = parse_addr(fields.get(2)?)?;
        let established = *fields.get(3)? == "01";
        let inode = fields.get(9)?.parse().ok()?;
        Some(Entry { remote, established, inode })
    }
}

/// `0100007F:0929` (IPv4, the u32 in host order) or 32 hex digits (IPv6, four
/// u32 words in host order), then the port in big-endian hex.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_parse() {
        let line = "   3: 0100007F:A1B2 0100007F:0929 01 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000000000000000 20 4 30 10 -1";
        let entry = Entry::parse(line).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(entry.remote, "127.0.0.1:2345".parse().unwrap());
        }
        assert!(entry.established);
        assert_eq!(entry.inode, 123456);
        let listening =
            "   0: 0100007F:0929 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 99 1";
        assert!(!Entry::parse(listening).unwrap().established);
    }

    #[test]
    fn mapped_ipv6_matches_ipv4() {
        let v4: SocketAddr = "127.0.0.1:2379".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:2379".parse().unwrap();
        assert!(same(v4, mapped));
        assert!(!same(v4, "127.0.0.1:2380".parse().unwrap()));
    }

    #[test]
    fn endpoints_become_addresses() {
        let addrs = endpoint_addrs(&["http://127.0.0.1:2379", "127.0.0.2:22379/"]).unwrap();
        assert_eq!(addrs, ["127.0.0.1:2379".parse().unwrap(), "127.0.0.2:22379".parse().unwrap()]);
    }

    /// A real connection of this very process is counted once, and only to its remote.
    #[test]
    fn counts_this_process_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pid = std::process::id();
        assert_eq!(established_connections(&[pid], &[addr]).unwrap(), 0);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (_server, _) = listener.accept().unwrap();
        // Both ends are this process, but only the client end has `addr` as its remote.
        assert_eq!(established_connections(&[pid, pid], &[addr]).unwrap(), 1);
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(established_connections(&[pid], &[other]).unwrap(), 0);
    }
}
