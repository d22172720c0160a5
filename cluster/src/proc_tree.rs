//! A child's process tree: the process and every descendant, for the status
//! table's RSS and CPU and for the memory limits. A worker may run programs
//! of its own (`tandem run`'s workers each run the user's program as their
//! child): what it costs the machine is the whole tree's.
//!
//! The master itself is counted alone: its descendants (the agent, the
//! workers) have rows of their own.

/// The most processes of one tree that are counted; the rest are left out.
/// Far above any worker's own children.
pub(crate) const MAX_TREE: usize = 4096;

/// `pid` and its descendants (children first found, breadth first), read from
/// `/proc/<pid>/task/<tid>/children`; only `pid` when it is this process, or
/// when the kernel does not offer those files.
pub(crate) fn tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    if pid == std::process::id() {
        return tree;
    }
    let mut next = 0;
    while next < tree.len() && tree.len() < MAX_TREE {
        let parent = tree[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else { continue };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
            for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if tree.len() < MAX_TREE && !tree.contains(&child) {
                    tree.push(child);
                }
            }
        }
    }
    tree
}

/// `read` summed over [`tree`]`(pid)`; `None` when `pid` itself cannot be
/// read (a descendant that just exited counts as 0).
pub(crate) fn sum<T: std::ops::Add<Output = T>>(pid: u32, read: impl Fn(u32) -> Option<T>) -> Option<T> {
    let mut pids = tree(pid).into_iter();
    let first = read(pids.next()?)?;
    Some(pids.filter_map(read).fold(first, |total, n| total + n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_process_is_in_its_parents_tree_and_the_master_counts_alone() {
        let mut sh = std::process::Command::new("sh").args(["-c", "sleep 30 & wait"]).spawn().unwrap();
        let pid = sh.id();
        // Bounded: the shell starts its child within moments.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let tree = tree(pid);
            if tree.len() >= 2 || std::time::Instant::now() > deadline {
                break tree;
            }
            std::thread::yield_now();
        };
        let counted = sum(pid, |_| Some(1u64));
        let unreadable = sum(pid, |p| (p != pid).then_some(1u64));
        let _ = sh.kill();
        let _ = sh.wait();
        assert_eq!(found[0], pid);
        assert_eq!(found.len(), 2, "sh and its sleep: {found:?}");
        assert_eq!(counted, Some(2));
        assert_eq!(unreadable, None, "the process itself unreadable: no figure");
        assert_eq!(tree(std::process::id()), vec![std::process::id()]);
    }
}
