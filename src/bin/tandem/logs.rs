//! `tandem logs NAME [--worker K | --agent] [--lines N] [--follow]`: the
//! children's log files of a cluster started with a log directory
//! (`Config::log_dir`, `--log-dir`). The directory comes from the master's
//! `info` answer (`log_dir`); the files are read directly, never through the
//! master.
//!
//! The last N lines are taken from the active file and, when it holds fewer,
//! from the rotated ones (`.1` first). `--follow` then polls the files every
//! 250 ms (a `stat` each: no CPU to speak of) and follows a file across its
//! rotation: it finishes the renamed file through its open descriptor, then
//! opens the new one. With more than one process shown, each line starts
//! with the process (`worker-2 | ...`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem::cluster::control::{ClusterInfo, ControlError, ProcessInfo, Request};

/// How often `--follow` looks at the files.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// How much is read from a file's end at a time, looking for its last lines.
const BLOCK: u64 = 64 * 1024;

/// Which processes to show.
#[derive(Debug, Clone, Copy)]
pub enum Which {
    All,
    Agent,
    Worker(u32),
}

pub async fn run(name: &str, which: Which, lines: usize, follow: bool) -> Result<(), ControlError> {
    let info: ClusterInfo = super::decode(super::ask(name, Request::Info).await?)?;
    let Some(dir) = info.log_dir else {
        return Err(ControlError::Failed(format!(
            "cluster {name} keeps no log files: start it with a log directory (Config::log_dir, --log-dir DIR); \
             its children write to the master's stdout and stderr"
        )));
    };
    let stems = match which {
        Which::Agent => vec!["agent".to_owned()],
        Which::Worker(k) => {
            let stem = format!("worker-{k}");
            if !dir.join(format!("{stem}.log")).exists() {
                let rows: Vec<ProcessInfo> = super::decode(super::ask(name, Request::Status).await?)?;
                let slots: Vec<String> = rows.iter().filter_map(|r| r.slot).map(|s| s.to_string()).collect();
                if !rows.iter().any(|r| r.slot == Some(k)) {
                    return Err(ControlError::Failed(format!(
                        "cluster {name} has no worker {k} and no log file of one (workers: {})",
                        slots.join(",")
                    )));
                }
            }
            vec![stem]
        }
        Which::All => stems_in(&dir),
    };
    let prefix = matches!(which, Which::All);
    let mut out = std::io::stdout().lock();
    for stem in &stems {
        for line in last_lines(&dir, stem, lines) {
            if write_line(&mut out, prefix.then_some(stem.as_str()), &line).is_err() {
                return Ok(()); // stdout closed (`| head`)
            }
        }
    }
    let _ = out.flush();
    drop(out);
    if follow {
        follow_files(&dir, which, prefix).await;
    }
    Ok(())
}

fn write_line(out: &mut impl Write, prefix: Option<&str>, line: &[u8]) -> std::io::Result<()> {
    if let Some(p) = prefix {
        write!(out, "{p} | ")?;
    }
    out.write_all(line)?;
    if !line.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// The processes with an active or rotated file in `dir`: `agent` first, then the workers by id.
fn stems_in(dir: &Path) -> Vec<String> {
    let mut stems = BTreeMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.split(".log").next().unwrap_or_default();
        let order = match stem {
            "agent" => Some(0),
            _ => stem.strip_prefix("worker-").and_then(|k| k.parse::<u64>().ok()).map(|k| k + 1),
        };
        if let Some(order) = order
            && name.contains(".log")
        {
            stems.insert(order, stem.to_owned());
        }
    }
    stems.into_values().collect()
}

/// The last `n` lines of `stem`: from its active file, then its rotated ones.
fn last_lines(dir: &Path, stem: &str, n: usize) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut index = 0;
    while lines.len() < n {
        let path = if index == 0 { dir.join(format!("{stem}.log")) } else { dir.join(format!("{stem}.log.{index}")) };
        let Ok(file) = File::open(&path) else {
            if index == 0 {
                index += 1;
                continue;
            }
            break;
        };
        let mut older = tail_of(file, n - lines.len());
        older.append(&mut lines);
        lines = older;
        index += 1;
    }
    lines
}

/// The last `n` lines of `file`, read backwards a block at a time.
fn tail_of(mut file: File, n: usize) -> Vec<Vec<u8>> {
    let Ok(len) = file.metadata().map(|m| m.len()) else { return Vec::new() };
    let mut start = len;
    let mut data: Vec<u8> = Vec::new();
    while start > 0 {
        let from = start.saturating_sub(BLOCK);
        let mut block = vec![0; (start - from) as usize];
        if file.seek(SeekFrom::Start(from)).is_err() || file.read_exact(&mut block).is_err() {
            break;
        }
        block.extend_from_slice(&data);
        data = block;
        start = from;
        // n lines need n + 1 newlines before the last line's end (or the file's start).
        let body = data.strip_suffix(b"\n").unwrap_or(&data);
        if body.iter().filter(|&&b| b == b'\n').count() >= n {
            break;
        }
    }
    let body = data.strip_suffix(b"\n").unwrap_or(&data);
    if body.is_empty() {
        return Vec::new();
    }
    let mut lines: Vec<Vec<u8>> = body.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    if start > 0 {
        lines.remove(0); // cut at a block's start: not a whole line
    }
    let skip = lines.len().saturating_sub(n);
    lines.drain(..skip);
    lines
}

/// One followed file: where it was read to, and the bytes of a line not ended yet.
struct Followed {
    path: PathBuf,
    file: Option<File>,
    inode: u64,
    offset: u64,
    partial: Vec<u8>,
}

impl Followed {
    /// From the current end of the file at `path` (or its start, once it appears).
    fn at_end(path: PathBuf) -> Followed {
        let mut followed = Followed { path, file: None, inode: 0, offset: 0, partial: Vec::new() };
        if let Ok(file) = File::open(&followed.path)
            && let Ok(meta) = file.metadata()
        {
            followed.inode = meta.ino();
            followed.offset = meta.len();
            followed.file = Some(file);
        }
        followed
    }

    /// The lines written since the last poll, across a rotation.
    fn poll(&mut self) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        let now = std::fs::metadata(&self.path).ok();
        let rotated = now.as_ref().is_some_and(|m| m.ino() != self.inode);
        // Whatever the old file got before its rename, then the new one from its start.
        self.read_new(&mut lines);
        if (rotated || self.file.is_none())
            && let Ok(file) = File::open(&self.path)
            && let Ok(meta) = file.metadata()
        {
            self.inode = meta.ino();
            self.offset = 0;
            self.file = Some(file);
            self.partial.clear();
            self.read_new(&mut lines);
        }
        lines
    }

    fn read_new(&mut self, lines: &mut Vec<Vec<u8>>) {
        let Some(file) = self.file.as_mut() else { return };
        let Ok(len) = file.metadata().map(|m| m.len()) else { return };
        if len < self.offset {
            // Truncated by hand: from its start.
            self.offset = 0;
            self.partial.clear();
        }
        if len == self.offset || file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut data = Vec::new();
        let Ok(read) = file.take(len - self.offset).read_to_end(&mut data) else { return };
        self.offset += read as u64;
        self.partial.extend_from_slice(&data);
        if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
            let rest = self.partial.split_off(end + 1);
            let done = std::mem::replace(&mut self.partial, rest);
            lines.extend(done.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec));
        }
    }
}

/// Prints the new lines of the chosen processes until killed (or stdout closes).
async fn follow_files(dir: &Path, which: Which, prefix: bool) {
    let wanted = |stem: &str| match which {
        Which::All => true,
        Which::Agent => stem == "agent",
        Which::Worker(k) => stem == format!("worker-{k}"),
    };
    let mut followed: BTreeMap<String, Followed> = BTreeMap::new();
    let mut stems: Vec<String> = match which {
        Which::All => stems_in(dir),
        Which::Agent => vec!["agent".to_owned()],
        Which::Worker(k) => vec![format!("worker-{k}")],
    };
    for stem in &stems {
        followed.insert(stem.clone(), Followed::at_end(dir.join(format!("{stem}.log"))));
    }
    let mut interval = tokio::time::interval(POLL_EVERY);
    loop {
        interval.tick().await;
        if matches!(which, Which::All) {
            // A worker added by a scale: followed from its first line.
            stems = stems_in(dir);
            let new: Vec<&String> = stems.iter().filter(|s| wanted(s) && !followed.contains_key(*s)).collect();
            for stem in new {
                let path = dir.join(format!("{stem}.log"));
                let entry = Followed { path, file: None, inode: 0, offset: 0, partial: Vec::new() };
                followed.insert(stem.clone(), entry);
            }
        }
        let mut out = std::io::stdout().lock();
        for (stem, f) in &mut followed {
            for line in f.poll() {
                if write_line(&mut out, prefix.then_some(stem.as_str()), &line).is_err() {
                    return;
                }
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_come_from_the_active_file_then_the_rotated_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agent.log.2"), "a\nb\n").unwrap();
        std::fs::write(dir.path().join("agent.log.1"), "c\nd\n").unwrap();
        std::fs::write(dir.path().join("agent.log"), "e\n").unwrap();
        let text = |n| {
            last_lines(dir.path(), "agent", n).into_iter().map(|l| String::from_utf8(l).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(text(1), ["e"]);
        assert_eq!(text(3), ["c", "d", "e"]);
        assert_eq!(text(10), ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn a_long_file_is_read_from_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..100_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(dir.path().join("worker-1.log"), text).unwrap();
        let lines = last_lines(dir.path(), "worker-1", 3);
        assert_eq!(lines, [b"line 99997".to_vec(), b"line 99998".to_vec(), b"line 99999".to_vec()]);
    }

    #[test]
    fn a_followed_file_is_followed_across_its_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker-1.log");
        std::fs::write(&path, "old\n").unwrap();
        let mut f = Followed::at_end(path.clone());
        assert!(f.poll().is_empty());
        let append = |p: &Path, s: &str| {
            std::fs::OpenOptions::new().append(true).create(true).open(p).unwrap().write_all(s.as_bytes()).unwrap()
        };
        append(&path, "one\ntw");
        assert_eq!(f.poll(), [b"one".to_vec()]);
        append(&path, "o\n");
        std::fs::rename(&path, dir.path().join("worker-1.log.1")).unwrap();
        append(&path, "three\n");
        assert_eq!(f.poll(), [b"two".to_vec(), b"three".to_vec()]);
        assert!(f.poll().is_empty());
    }
}
