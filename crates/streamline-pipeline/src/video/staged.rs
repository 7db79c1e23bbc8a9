//! Temporary outputs: built under a hidden name beside their target and renamed into place,
//! and recorded in one registry so that a signal handler can remove every one still in
//! progress ([`remove_staged`]).
//!
//! Every change to a staged path (creating it, writing into it, renaming it, removing it) runs
//! under the registry's lock, so a removal never races a write: a signal that arrives while a
//! frame is written waits for that frame, then removes the whole staging directory.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// What a registered path is, which says how it is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A staged file, ours alone.
    File,
    /// A staged directory, ours alone: removed with everything in it.
    Dir,
    /// A missing parent directory created for an output: removed only while empty.
    Parent,
}

/// The staged paths of this process not yet committed or removed, in creation order.
/// `closed` once [`remove_staged`] ran: nothing is staged, written or committed after it.
struct Registry {
    paths: Vec<(PathBuf, Kind)>,
    closed: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    paths: Vec::new(),
    closed: false,
});

/// The registry, even after a panic elsewhere poisoned its lock: cleaning up matters more then.
fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn interrupted() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "interrupted by a signal")
}

/// Runs `f`, a change to staged paths, while no signal handler can remove them; refused once
/// [`remove_staged`] ran.
pub(super) fn locked<T>(f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let registry = registry();
    if registry.closed {
        return Err(interrupted());
    }
    f()
}

fn remove(path: &Path, kind: Kind) {
    // Best effort: whatever brought us here is the error worth reporting.
    let _ = match kind {
        Kind::File => fs::remove_file(path),
        Kind::Dir => fs::remove_dir_all(path),
        Kind::Parent => fs::remove_dir(path),
    };
}

/// Removes every output still being built (newest first, so created parents are empty by
/// their turn) and refuses any further staging, writing or committing: for a SIGINT / SIGTERM
/// handler, before the process exits.
pub fn remove_staged() {
    let mut registry = registry();
    registry.closed = true;
    for (path, kind) in registry.paths.drain(..).rev() {
        remove(&path, kind);
    }
}

/// Removes what the staging of `target` left beside it when a process could not clean up
/// (SIGKILL, a lost node): hidden siblings `.NAME.PID.N.tmp` of other processes. Only for an
/// output that is the caller's alone, such as a batch job's; returns how many went.
pub fn remove_leftovers(target: &Path) -> io::Result<usize> {
    let (Some(name), parent) = (target.file_name(), target.parent()) else {
        return Ok(0);
    };
    let parent = match parent {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let (prefix, own) = (prefix.to_string_lossy().into_owned(), std::process::id());
    let mut removed = 0;
    let entries = match fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(middle) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix.as_str())?.strip_suffix(".tmp"))
        else {
            continue;
        };
        let pid = middle.split_once('.').and_then(|(pid, n)| {
            n.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| pid.parse::<u32>().ok())?
        });
        if pid.is_some_and(|pid| pid != own) {
            let kind = if entry.file_type()?.is_dir() {
                Kind::Dir
            } else {
                Kind::File
            };
            locked(|| {
                remove(&entry.path(), kind);
                Ok(())
            })?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A temporary file or directory beside an output, with the parent directories created for
/// it; removed when dropped unless committed, so every error path (and a panic unwinding
/// through the writer) cleans up after itself.
#[derive(Debug)]
pub(super) struct Staged {
    pub path: PathBuf,
    parents: Vec<PathBuf>,
}

impl Staged {
    /// A hidden sibling of `name` in `parent` (created, with its missing ancestors, if
    /// absent), unique to this process and call; a leftover of a crashed run with the same
    /// process id is stepped over, never reused. `make` creates it.
    fn create<T>(
        parent: &Path,
        name: &OsStr,
        kind: Kind,
        make: impl Fn(&Path) -> io::Result<T>,
    ) -> io::Result<(Staged, T)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut registry = registry();
        if registry.closed {
            return Err(interrupted());
        }
        let parents = create_parents(parent, &mut registry)?;
        let mut staged = Staged {
            path: PathBuf::new(),
            parents,
        };
        loop {
            let mut staged_name = OsString::from(".");
            staged_name.push(name);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            staged_name.push(format!(".{}.{n}.tmp", std::process::id()));
            let path = parent.join(staged_name);
            match make(&path) {
                Ok(made) => {
                    registry.paths.push((path.clone(), kind));
                    staged.path = path;
                    return Ok((staged, made));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    // `staged` then drops unlocked and removes the parents it made.
                    drop(registry);
                    return Err(e);
                }
            }
        }
    }

    pub fn dir(parent: &Path, name: &OsStr) -> io::Result<Staged> {
        Staged::create(parent, name, Kind::Dir, |path| fs::create_dir(path)).map(|(s, ())| s)
    }

    pub fn file(parent: &Path, name: &OsStr) -> io::Result<(Staged, File)> {
        Staged::create(parent, name, Kind::File, |path| {
            OpenOptions::new().write(true).create_new(true).open(path)
        })
    }

    /// Renames the staged path to `target`, which keeps the parents made for it: they leave
    /// the registry, so dropping `self` afterwards (once the lock is released, as locals go
    /// before arguments) removes nothing.
    pub fn commit(self, target: &Path) -> io::Result<()> {
        let mut registry = registry();
        if registry.closed {
            return Err(interrupted());
        }
        fs::rename(&self.path, target)?;
        registry
            .paths
            .retain(|(p, _)| *p != self.path && !self.parents.contains(p));
        Ok(())
    }
}

/// Creates the missing ancestors of `dir`, outermost first, recording each; returns them.
fn create_parents(dir: &Path, registry: &mut Registry) -> io::Result<Vec<PathBuf>> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && fs::symlink_metadata(a).is_err())
        .collect();
    let mut created = Vec::new();
    for path in missing.into_iter().rev() {
        match fs::create_dir(path) {
            Ok(()) => {
                registry.paths.push((path.to_path_buf(), Kind::Parent));
                created.push(path.to_path_buf());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                for made in created.iter().rev() {
                    remove(made, Kind::Parent);
                }
                registry.paths.retain(|(p, _)| !created.contains(p));
                return Err(e);
            }
        }
    }
    Ok(created)
}

impl Drop for Staged {
    fn drop(&mut self) {
        let mut registry = registry();
        let ours = |p: &PathBuf| *p == self.path || self.parents.contains(p);
        // After `remove_staged` nothing is registered: everything is gone already.
        let mine: Vec<(PathBuf, Kind)> = registry
            .paths
            .iter()
            .filter(|(p, _)| ours(p))
            .cloned()
            .collect();
        registry.paths.retain(|(p, _)| !ours(p));
        for (path, kind) in mine.into_iter().rev() {
            remove(&path, kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staged file and the parents made for it vanish on drop; a committed one stays with
    /// its parents.
    #[test]
    fn dropped_outputs_take_their_parents_with_them() {
        let root = std::env::temp_dir().join(format!("streamline-staged-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir(&root).unwrap();
        let deep = root.join("a/b");
        let (staged, _) = Staged::file(&deep, OsStr::new("out.gif")).unwrap();
        assert!(staged.path.is_file() && staged.path.starts_with(&deep));
        drop(staged);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "a/b was removed");

        let (staged, _) = Staged::file(&deep, OsStr::new("out.gif")).unwrap();
        staged.commit(&deep.join("out.gif")).unwrap();
        assert!(deep.join("out.gif").is_file());
        fs::remove_dir_all(&root).unwrap();
    }

    /// Another process's leftovers of an output go, with nothing else: not this process's
    /// staging in progress, not another output's, not the output itself.
    #[test]
    fn leftovers_of_killed_runs_are_removed() {
        let root =
            std::env::temp_dir().join(format!("streamline-leftovers-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir(&root).unwrap();
        let keep = ["a.mp4", ".b.mp4.1.0.tmp", ".a.mp4.x.0.tmp", "a.mp4.1.0.tmp"];
        for name in keep.iter().chain(&[".a.mp4.1.0.tmp"]) {
            fs::write(root.join(name), "").unwrap();
        }
        fs::create_dir(root.join(".a.mp4.2.7.tmp")).unwrap();
        let (ours, _) = Staged::file(&root, OsStr::new("a.mp4")).unwrap();
        assert_eq!(remove_leftovers(&root.join("a.mp4")).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
        expected.push(
            ours.path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        );
        expected.sort();
        assert_eq!(left, expected);
        drop(ours);
        fs::remove_dir_all(&root).unwrap();
    }
}
