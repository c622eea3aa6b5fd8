//! Waking the agent loop as soon as a source has news, instead of at its next tick: a
//! change is then programmed in the time translation and sync take, not up to a tick later.
use std::{
    ffi::CString,
    fs::File,
    io::Read as _,
    os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _},
    path::Path,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

/// A flag a source raises and the agent loop waits on (with a timeout: the loop also has
/// periodic work).
#[derive(Clone, Default)]
pub struct Wake(Arc<(Mutex<bool>, Condvar)>);

impl Wake {
    pub fn notify(&self) {
        let (pending, signal) = &*self.0;
        if let Ok(mut pending) = pending.lock() {
            *pending = true;
            signal.notify_one();
        }
    }

    /// Waits until notified or until `timeout` passed; returns whether it was notified.
    pub fn wait(&self, timeout: Duration) -> bool {
        let (pending, signal) = &*self.0;
        let Ok(guard) = pending.lock() else {
            std::thread::sleep(timeout);
            return false;
        };
        match signal.wait_timeout_while(guard, timeout, |pending| !*pending) {
            Ok((mut pending, _)) => std::mem::take(&mut *pending),
            Err(_) => false,
        }
    }
}

/// Notifies `wake` whenever a file in `dir` is created, written and closed, moved or
/// removed (inotify), from a thread of its own. An error leaves the caller polling.
pub fn watch_dir(dir: &Path, wake: Wake) -> std::io::Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: plain syscall; the descriptor is owned by `file` below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    // ConfigMap volumes swap a `..data` symlink (create + move); editors write in place.
    let mask = libc::IN_CLOSE_WRITE
        | libc::IN_CREATE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_DELETE
        | libc::IN_ATTRIB
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    if unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::Builder::new()
        .name("manifests-watch".into())
        .spawn(move || {
            let mut events = [0u8; 4096];
            while let Ok(n) = file.read(&mut events) {
                if n == 0 {
                    break;
                }
                wake.notify();
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_the_directory_wakes_the_waiter() {
        let dir = std::env::temp_dir().join(format!("xlb-wake-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let wake = Wake::default();
        watch_dir(&dir, wake.clone()).expect("inotify");
        assert!(
            !wake.wait(Duration::from_millis(20)),
            "nothing happened yet"
        );
        std::fs::write(dir.join("svc.yaml"), "x").expect("write");
        assert!(wake.wait(Duration::from_secs(5)), "the write was not seen");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn notify_before_wait_is_not_lost() {
        let wake = Wake::default();
        wake.notify();
        assert!(wake.wait(Duration::from_millis(1)));
        assert!(!wake.wait(Duration::from_millis(1)));
    }
}
