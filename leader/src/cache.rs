//! The last-known-good cache: the newest live value of every subscribed key, on disk.
//!
//! ```text
//! hub: live value of k --save(k, v)--> pending (one entry per key, newest wins)
//!                                          | writer task, off the hub's path
//!                                          v
//!            <dir>/.<name>.<pid>.<n>.tmp  --write, fsync-->  rename to <dir>/<name>.lkg, fsync <dir>
//! hub: first subscriber of k while the upstream is not Ready --load(k)--> Event{cached: true}
//! ```
//!
//! One file per (channel, key). `<name>` is the 32 hex digits of the XXH3-128
//! hash of the channel name and the key bytes (keys are arbitrary bytes; the
//! name is always safe); the file holds the channel and key themselves, and a
//! file whose channel or key differ from the ones asked for is ignored.
//!
//! File format (version 1): the 8 bytes `TDMLKG\0\x01`, the body length (u32,
//! big-endian), the XXH3-64 of the body (u64, big-endian), then the body: a
//! MessagePack array `[channel: str, key: bin, saved_at_ms: uint, payload: bin]`
//! (`payload` is the event exactly as the upstream produced it).
//!
//! The directory must belong to this user with mode 0700 (it is created so);
//! files are written 0600 to a temporary name, fsynced, renamed over the old
//! file, and the directory is fsynced: a reader sees the old value or the new
//! one, never a torn file. Files that are corrupt, foreign, too large,
//! symbolic links or not owned by this user are ignored with a WARN naming the
//! file and the reason. Nothing is ever deleted but stale temporary files of
//! dead processes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Error;

const MAGIC: &[u8; 8] = b"TDMLKG\x00\x01";
const HEADER: usize = 8 + 4 + 8;
/// The largest cache file read back. The default frame limit is 16 MiB, so a
/// value that could be sent fits.
pub(crate) const MAX_FILE_BYTES: u64 = 64 << 20;
const SUFFIX: &str = ".lkg";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    channel: String,
    key: Bytes,
    saved_at_ms: u64,
    payload: Bytes,
}

type PendingKey = (Arc<str>, Bytes);

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    uid: u32,
    /// Values waiting to be written: at most one per key (a newer value
    /// replaces a pending older one), so the memory is bounded by the keys.
    pending: Mutex<HashMap<PendingKey, Bytes>>,
    notify: Notify,
    next_tmp: AtomicU64,
    /// The last batch had a failed write (so the next success is logged).
    failing: AtomicBool,
}

/// A last-known-good cache directory. Open it with [`Cache::open`] and give it
/// to [`LeaderBuilder::cache`](crate::LeaderBuilder::cache). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl Cache {
    /// Opens (creating it with mode 0700 if missing) a cache directory.
    ///
    /// An existing directory must belong to this user and be closed to others
    /// (no group or other permission bits), like the leader's socket directory:
    /// otherwise [`Error::ForeignCacheDirectory`], [`Error::InsecureCacheDirectory`]
    /// or [`Error::CacheNotADirectory`] says what to fix. Stale
    /// temporary files of dead processes are removed; files that are not
    /// tandem's are reported at WARN and left alone.
    pub fn open(dir: impl AsRef<Path>) -> Result<Cache, Error> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.clone();
        let io_error = move |source| Error::CacheDirectory { path: path.clone(), source };
        let uid = nix::unistd::geteuid().as_raw();
        match std::fs::metadata(&dir) {
            Ok(meta) => {
                if !meta.is_dir() {
                    return Err(Error::CacheNotADirectory { path: dir });
                }
                // The owner first: only the owner can fix the mode.
                if meta.uid() != uid {
                    return Err(Error::ForeignCacheDirectory { path: dir, owner: meta.uid(), uid });
                }
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    return Err(Error::InsecureCacheDirectory { path: dir, mode });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(&io_error)?;
            }
            Err(e) => return Err(io_error(e)),
        }
        let cache = Cache {
            inner: Arc::new(Inner {
                dir,
                uid,
                pending: Mutex::default(),
                notify: Notify::new(),
                next_tmp: AtomicU64::new(0),
                failing: AtomicBool::new(false),
            }),
        };
        cache.sweep().map_err(&io_error)?;
        tracing::info!(path = %cache.inner.dir.display(), "last-known-good cache opened");
        Ok(cache)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The file that holds `key` of `channel`.
    pub fn file_of(&self, channel: &str, key: &[u8]) -> PathBuf {
        let mut hashed = Vec::with_capacity(8 + channel.len() + key.len());
        hashed.extend_from_slice(&(channel.len() as u64).to_be_bytes());
        hashed.extend_from_slice(channel.as_bytes());
        hashed.extend_from_slice(key);
        let name = format!("{:032x}{SUFFIX}", xxhash_rust::xxh3::xxh3_128(&hashed));
        self.inner.dir.join(name)
    }

    /// Removes temporary files left by dead processes; warns about foreign files.
    fn sweep(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.inner.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(pid) = temp_file_pid(&name) {
                let alive = pid == std::process::id()
                    || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
                if !alive {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => {
                            tracing::info!(file = %entry.path().display(), "removed a stale cache temporary file")
                        }
                        Err(error) => {
                            tracing::warn!(file = %entry.path().display(), %error, "cannot remove a stale cache temporary file")
                        }
                    }
                }
            } else if !is_cache_file_name(&name) {
                tracing::warn!(file = %entry.path().display(), "not a tandem cache file; ignored");
            }
        }
        Ok(())
    }

    /// Queues the newest live value of a key for writing (never waits).
    pub(crate) fn save(&self, channel: &Arc<str>, key: &Bytes, payload: Bytes) {
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert((channel.clone(), key.clone()), payload);
        drop(pending);
        self.inner.notify.notify_one();
    }

    /// The cached value of a key, if a valid file holds one (blocking I/O).
    /// Anything wrong with the file is logged at WARN and yields `None`.
    pub(crate) fn load(&self, channel: &str, key: &[u8]) -> Option<Bytes> {
        let path = self.file_of(channel, key);
        match self.read(&path, channel, key) {
            Ok(found) => found,
            Err(reason) => {
                tracing::warn!(file = %path.display(), channel, %reason, "cache file ignored");
                None
            }
        }
    }

    fn read(&self, path: &Path, channel: &str, key: &[u8]) -> Result<Option<Bytes>, String> {
        let opened = OpenOptions::new()
            .read(true)
            // No symlinks; no blocking on a FIFO planted under the name.
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path);
        let mut file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Err("it is a symbolic link".into()),
            Err(e) => return Err(format!("cannot open it: {e}")),
        };
        let meta = file.metadata().map_err(|e| format!("cannot stat it: {e}"))?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        if meta.uid() != self.inner.uid {
            return Err(format!("owned by uid {}, not this user", meta.uid()));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(format!("{} bytes, over the {MAX_FILE_BYTES}-byte limit", meta.len()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).map_err(|e| format!("cannot read it: {e}"))?;
        let record = decode(&bytes)?;
        if record.channel != channel || record.key[..] != *key {
            return Err(format!(
                "it holds another entry (channel {:?}, a {}-byte key): a hash collision or a foreign file",
                record.channel,
                record.key.len()
            ));
        }
        Ok(Some(record.payload))
    }

    /// Writes pending values until `cancel`, then writes what is left and ends.
    pub(crate) async fn run_writer(self, cancel: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                _ = self.inner.notify.notified() => false,
                _ = cancel.cancelled() => true,
            };
            let batch = std::mem::take(&mut *self.inner.pending.lock().unwrap_or_else(|p| p.into_inner()));
            if !batch.is_empty() {
                let cache = self.clone();
                if let Err(error) = tokio::task::spawn_blocking(move || cache.write_batch(batch)).await {
                    tracing::error!(%error, "cache writer task failed");
                }
            }
            if stopping {
                return;
            }
        }
    }

    fn write_batch(&self, batch: HashMap<PendingKey, Bytes>) {
        let (mut written, mut failed) = (0usize, 0usize);
        let mut first_error = None;
        for ((channel, key), payload) in batch {
            match self.write(&channel, &key, payload) {
                Ok(()) => written += 1,
                Err(error) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| (self.file_of(&channel, &key), error));
                }
            }
        }
        if written > 0
            && let Err(error) = File::open(&self.inner.dir).and_then(|dir| dir.sync_all())
        {
            first_error.get_or_insert_with(|| (self.inner.dir.clone(), error));
            failed += 1;
        }
        match first_error {
            Some((file, error)) => {
                if !self.inner.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(file = %file.display(), %error, failed, "cannot write the last-known-good cache");
                } else {
                    tracing::debug!(file = %file.display(), %error, failed, "cache writes still failing");
                }
            }
            None => {
                if self.inner.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %self.inner.dir.display(), "cache writes succeed again");
                }
            }
        }
    }

    /// One atomic write: temporary file (0600), fsync, rename over the old file.
    fn write(&self, channel: &str, key: &Bytes, payload: Bytes) -> io::Result<()> {
        let saved_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let record = Record { channel: channel.to_string(), key: key.clone(), saved_at_ms, payload };
        let bytes = encode(&record)?;
        let path = self.file_of(channel, key);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self.inner.dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                .open(&tmp)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn encode(record: &Record) -> io::Result<Vec<u8>> {
    let body = rmp_serde::to_vec(record).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("cache entry over 4 GiB"))?;
    let mut bytes = Vec::with_capacity(HEADER + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_be_bytes());
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> Result<Record, String> {
    if bytes.len() < HEADER {
        return Err(format!("truncated: {} bytes, shorter than the {HEADER}-byte header", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("not a tandem cache file of a known format (bad magic)".into());
    }
    let len = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&bytes[12..20]);
    let body = &bytes[HEADER..];
    if body.len() != len {
        return Err(format!("truncated or padded: the header announces {len} bytes, the file has {}", body.len()));
    }
    if xxhash_rust::xxh3::xxh3_64(body) != u64::from_be_bytes(sum) {
        return Err("checksum mismatch (corrupt)".into());
    }
    rmp_serde::from_slice(body).map_err(|e| format!("undecodable entry: {e}"))
}

fn is_cache_file_name(name: &str) -> bool {
    name.strip_suffix(SUFFIX).is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pid in a temporary file name `.<name>.lkg.<pid>.<n>.tmp`.
fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = rest.rsplitn(3, '.');
    let _n: u64 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    is_cache_file_name(parts.next()?).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_damage_is_named() {
        let record = Record {
            channel: "c".into(),
            key: Bytes::from_static(b"\x00k"),
            saved_at_ms: 5,
            payload: Bytes::from_static(b"v"),
        };
        let bytes = encode(&record).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!((back.channel.as_str(), &back.key[..], &back.payload[..]), ("c", &b"\x00k"[..], &b"v"[..]));
        assert!(decode(&bytes[..bytes.len() - 1]).unwrap_err().contains("truncated"));
        assert!(decode(&bytes[..10]).unwrap_err().contains("truncated"));
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(decode(&flipped).unwrap_err().contains("checksum"));
        assert!(decode(b"garbage garbage garbage").unwrap_err().contains("magic"));
    }

    #[test]
    fn temp_names_parse_only_our_own_pattern() {
        let name = format!(".{}{SUFFIX}.1234.7.tmp", "a".repeat(32));
        assert_eq!(temp_file_pid(&name), Some(1234));
        assert_eq!(temp_file_pid(".x.lkg.1234.7.tmp"), None);
        assert_eq!(temp_file_pid("notes.tmp"), None);
    }
}
