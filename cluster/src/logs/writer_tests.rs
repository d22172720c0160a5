//! The writer's state machine on a real temp directory; a full disk is an
//! injected `ENOSPC` (a small tmpfs needs root).

use super::*;

const KIB: u64 = 1024;

fn writer(dir: &Path, file_size: u64, quota: u64) -> Writer {
    Writer::open(dir, Limits { file_size, quota }, false, Arc::new(LogStats::default())).unwrap()
}

/// The bytes of every file in `dir`.
fn on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

/// `n` lines `<tag> <i> xxxx...` of about 100 bytes each.
fn lines(tag: &str, from: usize, n: usize) -> Vec<u8> {
    (from..from + n).map(|i| format!("{tag} {i:06} {}\n", "x".repeat(80))).collect::<String>().into_bytes()
}

#[test]
fn a_file_is_rotated_at_its_size_and_the_lines_go_on_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path(), 64 * KIB, 10 * 64 * KIB);
    let p: Arc<str> = Arc::from("worker-1");
    // 2000 lines of 96 bytes: about 3 files.
    for batch in 0..20 {
        w.write(&p, &lines("w1", batch * 100, 100));
    }
    assert_eq!(names(dir.path()), ["worker-1.log", "worker-1.log.1", "worker-1.log.2"]);
    for name in ["worker-1.log.1", "worker-1.log.2"] {
        let size = std::fs::metadata(dir.path().join(name)).unwrap().len();
        assert!(size <= 64 * KIB && size > 60 * KIB, "{name}: {size}");
    }
    // Oldest first: .2, .1, then the active file: every line once, in order.
    let all =
        read(dir.path(), "worker-1.log.2") + &read(dir.path(), "worker-1.log.1") + &read(dir.path(), "worker-1.log");
    let numbers: Vec<usize> = all.lines().map(|l| l.split(' ').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(numbers, (0..2000).collect::<Vec<_>>());
    assert_eq!(w.stats.bytes_written.load(Ordering::Relaxed), on_disk(dir.path()));
}

#[test]
fn the_quota_is_never_passed_the_oldest_file_of_any_process_goes_first_and_a_line_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let quota = 4 * 64 * KIB;
    let mut w = writer(dir.path(), 64 * KIB, quota);
    let (agent, worker): (Arc<str>, Arc<str>) = (Arc::from("agent"), Arc::from("worker-2"));
    // The agent's file first: the oldest rotated file of all.
    for i in 0..7 {
        w.write(&agent, &lines("agent", i * 100, 100));
    }
    assert_eq!(names(dir.path()), ["agent.log", "agent.log.1"]);
    for i in 0..100 {
        w.write(&worker, &lines("w2", i * 50, 50));
        let total = on_disk(dir.path());
        assert!(total <= quota, "{total} bytes on disk after write {i}, over the quota of {quota}");
        assert_eq!(total, w.total, "the account is the disk");
    }
    let files = names(dir.path());
    assert!(!files.contains(&"agent.log.1".to_owned()), "the agent's old file went first: {files:?}");
    assert!(files.contains(&"agent.log".to_owned()), "an active file is rotated only when nothing else is left");
    let deleted = w.stats.files_deleted.load(Ordering::Relaxed);
    assert!(deleted >= 4, "{deleted}");
    let notes: Vec<String> = files
        .iter()
        .flat_map(|f| {
            read(dir.path(), f)
                .lines()
                .filter(|l| l.contains(" INFO tandem_cluster::logs: deleted "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!notes.is_empty(), "no line says a file was deleted");
    assert!(notes.iter().all(|n| n.contains(&format!("quota of {quota} bytes"))), "{notes:#?}");
    assert!(on_disk(dir.path()) > quota - 2 * 64 * KIB, "the quota is used, not wasted");
}

#[test]
fn a_full_disk_drops_and_counts_warns_once_and_a_line_gives_the_count_when_writing_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path(), 64 * KIB, 4 * 64 * KIB);
    let p: Arc<str> = Arc::from("worker-1");
    w.write(&p, b"before\n");
    w.fail_writes = Some(libc::ENOSPC);
    for i in 0..10 {
        w.write(&p, &lines("lost", i * 3, 3));
    }
    assert!(w.failing);
    assert_eq!(w.stats.dropped_lines("worker-1"), 30);
    assert_eq!(w.failed_lines, 30);
    w.fail_writes = None;
    w.write(&p, b"after\n");
    assert!(!w.failing);
    let text = read(dir.path(), "worker-1.log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "before");
    assert!(lines[1].contains("WARN tandem_cluster::logs: 30 lines of this process were dropped"), "{text}");
    assert_eq!(lines[2], "after");
    assert_eq!(lines.len(), 3);
    assert_eq!(w.stats.dropped_lines("worker-1"), 30, "counted once");
}

#[test]
fn the_drops_of_a_full_queue_are_reported_in_the_process_s_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path(), 64 * KIB, 4 * 64 * KIB);
    let p: Arc<str> = Arc::from("agent");
    let chunk = |data: &[u8], dropped_before| super::super::queue::Chunk {
        process: Arc::clone(&p),
        data: data.to_vec(),
        lines: count_lines(data),
        dropped_before,
    };
    w.write_batch(vec![chunk(b"first\n", 0), chunk(b"next\n", 7), chunk(b"", 2)]);
    let text = read(dir.path(), "agent.log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "first");
    // The drops, announced where they happened: after `first`, before `next`.
    assert!(lines[1].contains("7 lines of this process were dropped"), "{text}");
    assert_eq!(lines[2], "next");
    // An empty chunk (a pipe's end) says its drops at once.
    assert!(lines[3].contains("2 lines of this process were dropped"), "{text}");
    assert_eq!(lines.len(), 4);
}

#[test]
fn json_logs_get_json_lines_from_the_master_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut w =
        Writer::open(dir.path(), Limits { file_size: 64 * KIB, quota: 128 * KIB }, true, Arc::new(LogStats::default()))
            .unwrap();
    let p: Arc<str> = Arc::from("agent");
    w.procs.entry(Arc::clone(&p)).or_default().dropped = 2;
    w.write(&p, b"{\"x\":1}\n");
    let text = read(dir.path(), "agent.log");
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["level"], "WARN");
    assert_eq!(first["target"], "tandem_cluster::logs");
    assert!(first["fields"]["message"].as_str().unwrap().starts_with("2 lines"));
}

#[test]
fn the_files_of_a_previous_master_are_taken_over_numbered_without_gaps_and_held_to_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: u64| std::fs::write(dir.path().join(name), vec![b'\n'; bytes as usize]).unwrap();
    write("worker-1.log", 10 * KIB);
    write("worker-1.log.2", 60 * KIB);
    write("worker-1.log.7", 60 * KIB);
    write("agent.log.1", 60 * KIB);
    write("notes.txt", 500 * KIB); // not ours: neither counted nor touched
    write("worker-01.log", KIB);
    let w = writer(dir.path(), 64 * KIB, 128 * KIB);
    // 190 KiB of ours, quota 128 KiB: the oldest go (the same mtime: any order of them).
    assert!(w.total <= 128 * KIB, "{}", w.total);
    let files = names(dir.path());
    assert!(files.contains(&"notes.txt".to_owned()) && files.contains(&"worker-01.log".to_owned()));
    assert!(files.contains(&"worker-1.log".to_owned()));
    let rotated: Vec<&String> = files.iter().filter(|f| f.starts_with("worker-1.log.")).collect();
    assert!(rotated.iter().all(|f| f.as_str() == "worker-1.log.1"), "renumbered from 1: {files:?}");
    assert_eq!(
        w.total,
        files
            .iter()
            .filter(|f| f.starts_with("worker-1.") || f.starts_with("agent."))
            .map(|f| std::fs::metadata(dir.path().join(f)).unwrap().len())
            .sum::<u64>()
    );
}

#[test]
fn a_process_keeps_at_most_max_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = writer(dir.path(), 64 * KIB, 1024 * 64 * KIB);
    let p: Arc<str> = Arc::from("worker-9");
    for i in 0..(MAX_ROTATED + 5) {
        w.write(&p, &lines("w9", i * 700, 700));
    }
    let rotated = names(dir.path()).iter().filter(|f| f.starts_with("worker-9.log.")).count();
    assert_eq!(rotated, MAX_ROTATED);
    assert!(dir.path().join(format!("worker-9.log.{MAX_ROTATED}")).exists());
}

#[test]
fn a_removed_directory_drops_and_counts_once_the_open_file_is_rotated() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("c");
    std::fs::create_dir(&dir).unwrap();
    let mut w = writer(&dir, 64 * KIB, 4 * 64 * KIB);
    let p: Arc<str> = Arc::from("worker-1");
    w.write(&p, &lines("a", 0, 10));
    std::fs::remove_dir_all(&dir).unwrap();
    for i in 0..20 {
        w.write(&p, &lines("b", i * 100, 100));
    }
    assert!(w.failing);
    assert!(w.stats.dropped_lines("worker-1") > 0);
}

#[test]
fn prefixes_end_at_a_line_within_the_room() {
    assert_eq!(prefix_within(b"ab\ncd\n", 10), 6);
    assert_eq!(prefix_within(b"ab\ncd\n", 5), 3);
    assert_eq!(prefix_within(b"abcd\n", 3), 0);
    assert!(is_stem("agent") && is_stem("worker-12"));
    assert!(!is_stem("worker-") && !is_stem("worker-01") && !is_stem("master") && !is_stem("worker-1a"));
}
