//! Tests of the election's checks, lock files and fences.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::checks::{ensure_private_dir, validate_name, validate_socket_path};
use super::epoch::store_epoch;
use super::lock::{file_id, still_leader};
use super::*;

fn private_base() -> tempfile::TempDir {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    base
}

#[test]
fn names_that_cannot_name_a_file_are_refused() {
    for bad in ["", ".", "..", "a/b", "/abs", "nul\0byte", &"n".repeat(201)] {
        let error = validate_name(bad).unwrap_err();
        assert!(matches!(error, StartupError::InvalidName { .. }), "{bad:?}: {error}");
    }
    for good in ["app", "my-app_2", "a.b", &"n".repeat(200)] {
        validate_name(good).unwrap();
    }
}

#[test]
fn socket_paths_are_limited_to_what_sun_path_holds() {
    let fits = PathBuf::from(format!("/{}", "s".repeat(MAX_SOCKET_PATH - 1)));
    assert_eq!(fits.as_os_str().len(), MAX_SOCKET_PATH);
    validate_socket_path(&fits).unwrap();
    let over = PathBuf::from(format!("/{}", "s".repeat(MAX_SOCKET_PATH)));
    let error = validate_socket_path(&over).unwrap_err();
    assert!(matches!(error, StartupError::SocketPathTooLong { len: 108, max: 107, .. }), "{error}");
    // The limit is real: the kernel refuses one byte more.
    let base = private_base();
    let name = "s".repeat(MAX_SOCKET_PATH + 1 - base.path().as_os_str().len() - 1);
    let path = base.path().join(name);
    assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH + 1);
    assert!(std::os::unix::net::UnixListener::bind(&path).is_err());
    let path = path.with_file_name(&path.file_name().unwrap().to_str().unwrap()[1..]);
    std::os::unix::net::UnixListener::bind(&path).unwrap();
}

#[test]
fn directories_are_created_private_and_loose_ones_refused_untouched() {
    let base = private_base();
    let fresh = base.path().join("a/b");
    ensure_private_dir(&fresh).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o077;
    assert_eq!(mode, 0, "created without group or other bits");
    ensure_private_dir(&fresh).unwrap();

    let loose = base.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    let error = ensure_private_dir(&loose).unwrap_err();
    assert!(matches!(error, StartupError::InsecureDirectory { mode: 0o755, .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(&*loose.to_string_lossy()) && message.contains("0755") && message.contains("chmod 700"));
    assert_eq!(std::fs::metadata(&loose).unwrap().permissions().mode() & 0o777, 0o755, "refused, not changed");

    let file = base.path().join("file");
    std::fs::write(&file, b"").unwrap();
    assert!(matches!(ensure_private_dir(&file), Err(StartupError::NotADirectory { .. })));
}

fn standalone(dir: &Path) -> Standalone {
    Standalone::new("app", dir, |builder| builder)
}

#[test]
fn a_takeover_replaces_the_lock_file_and_fences_the_hung_leader() {
    let base = private_base();
    let dir = base.path();
    let (a, b, c) = (standalone(dir), standalone(dir), standalone(dir));
    let (a_lock, a_id) = a.try_lock().unwrap().expect("the lock is free");
    store_epoch(&dir.join("app.epoch"), 1).unwrap();
    let a_holds = still_leader(a.lock_path(), a_id, dir.join("app.epoch"), 1);
    assert!(a_holds());
    assert!(b.try_lock().unwrap().is_none(), "held by a");

    // b gave a up for hung at epoch 1: it takes the place, a new lock file in the old one's.
    assert!(b.take_over(0).unwrap().is_none(), "not at the epoch b saw: someone else took over already");
    let (b_lock, b_id, b_turn) = b.take_over(1).unwrap().expect("b takes a's place");
    assert_eq!(c.take_over(1).unwrap_err().kind(), io::ErrorKind::WouldBlock, "one takeover at a time");
    drop(b_turn);
    assert_ne!(a_id, b_id);
    assert!(!a_holds(), "a's lock file is gone from the path: a is fenced");
    assert!(c.take_over(1).unwrap().is_some_and(|(_, id, _)| id != b_id), "a second takeover at the same epoch...");
    // ...is what the takeover lock and the stored epoch prevent in practice: the new leader stores epoch 2.
    store_epoch(&dir.join("app.epoch"), 2).unwrap();
    assert!(c.take_over(1).unwrap().is_none(), "the epoch moved on: nothing to take over");

    // a exiting frees only the file it locked: nobody can win with it.
    drop(a_lock);
    drop(b_lock);
    let (_c_lock, c_id) = c.try_lock().unwrap().expect("every holder of the current file is gone");
    assert_eq!(file_id(&c.lock_path()).unwrap(), c_id);
    assert!(a.try_lock().unwrap().is_none());
}

#[test]
fn a_later_epoch_or_a_removed_lock_file_fences_too() {
    let base = private_base();
    let dir = base.path();
    let a = standalone(dir);
    let (_lock, id) = a.try_lock().unwrap().unwrap();
    let epoch_file = dir.join("app.epoch");
    store_epoch(&epoch_file, 4).unwrap();
    let holds = still_leader(a.lock_path(), id, epoch_file.clone(), 4);
    assert!(holds());
    store_epoch(&epoch_file, 5).unwrap();
    assert!(!holds(), "a later leader stored its epoch");
    store_epoch(&epoch_file, 4).unwrap();
    assert!(holds());
    std::fs::remove_file(a.lock_path()).unwrap();
    assert!(!holds(), "the lock file was removed under the leader");
}

#[test]
fn a_startup_error_survives_the_trip_through_io_error_and_others_stay_io() {
    let error = StartupError::NotADirectory { dir: "/x".into() }.into_io();
    let failure = StartupError::from_io(error).unwrap();
    assert!(matches!(failure.error(), StartupError::NotADirectory { .. }));
    let plain = io::Error::from_raw_os_error(2);
    let back = StartupError::from_io(plain).unwrap_err();
    assert_eq!(back.raw_os_error(), Some(2));
    let other = io::Error::other("something else");
    assert_eq!(StartupError::from_io(other).unwrap_err().to_string(), "something else");
}

#[test]
fn a_standby_seeds_only_from_a_complete_snapshot_of_the_leader_it_succeeds() {
    use super::lead::warm_seed;
    use crate::mirror::MirrorLink;
    use crate::mirror::tests::{entry, mirror_leader};

    // Never complete: cold.
    let mut link = MirrorLink::new();
    let mirror = link.adopt();
    mirror_leader(&mut link, 1, vec![vec![entry("a", 1, 1)]], false);
    assert!(warm_seed(&mirror, 1).is_empty());

    // Complete for the leader of epoch 1, which died: warm.
    let mut link = MirrorLink::new();
    let mirror = link.adopt();
    mirror_leader(&mut link, 1, vec![vec![entry("a", 1, 4)]], true);
    assert_eq!(warm_seed(&mirror, 1), vec![entry("a", 1, 4)]);

    // Epoch 1's leader was lost, the standby reconnected to epoch 2's but
    // its snapshot never completed before epoch 2's leader died: cold, never
    // epoch 1's stale state.
    link.lost(&crate::Error::LeaderLost);
    mirror_leader(&mut link, 2, vec![vec![entry("b", 2, 1)]], false);
    assert!(mirror.status().synced, "a snapshot was complete once");
    assert!(warm_seed(&mirror, 2).is_empty(), "{:?}", warm_seed(&mirror, 2));
}
