//! Waking the agent loop as soon as a source has news, instead of at its next tick: a
//! change is then programmed in the time translation and sync take, not up to a tick later.
use std::{
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
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    // ConfigMap volumes swap a `..data` symlink (create + move); editors write in place.
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    inotify.add_watch(dir, mask)?;
    std::thread::Builder::new()
        .name("manifests-watch".into())
        .spawn(move || {
            while let Ok(events) = inotify.read_events() {
                if !events.is_empty() {
                    wake.notify();
                }
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
