//! Which forgets a batch missed. A lane sanitizes a batch, then writes it, perhaps much later (an output that cannot
//! be written waits); a forget in between destroys keys the batch may hold. The keyring logs each forget it sees
//! (its scope's tag, numbered), and a batch notes the tags of the scopes whose keys it resolved while it was
//! sanitized ([`recording`]): before it is written, the lane asks whether a forget since then touched one of them
//! ([`ForgetLog::since`]), and sanitizes the batch again only then — so a run of forgets of other subjects (a bulk
//! erasure) never holds a lane up.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The forgets remembered: past this many since a batch's keys were resolved, the batch is sanitized again.
const REMEMBERED: usize = 65_536;

/// A scope's tag: its text folded eight bytes at a time (FNV-1a's constants, a word per step: a subject scope is a
/// keyed hash, and this runs for every key a batch resolves). Two scopes with one tag only make a batch sanitized
/// again for nothing.
pub fn tag(scope: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = scope.as_bytes();
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        hash ^= u64::from_le_bytes(word.try_into().expect("eight bytes"));
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    hash ^= u64::from_le_bytes(last) ^ ((bytes.len() as u64) << 56);
    hash.wrapping_mul(0x0100_0000_01b3)
}

thread_local! {
    static RESOLVED: RefCell<Option<Vec<u64>>> = const { RefCell::new(None) };
}

/// Runs `work`, and returns with its result the tags of the scopes whose live keys it resolved on this thread,
/// sorted, each once.
pub fn recording<R>(work: impl FnOnce() -> R) -> (R, Vec<u64>) {
    /// Puts back what was recorded before, also when `work` panics (the thread goes back to a pool).
    struct Restore(Option<Option<Vec<u64>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                RESOLVED.with(|r| *r.borrow_mut() = outer);
            }
        }
    }
    let mut restore = Restore(Some(RESOLVED.with(|r| r.borrow_mut().replace(Vec::new()))));
    let result = work();
    let outer = restore.0.take().expect("restored once");
    let mut tags = RESOLVED
        .with(|r| std::mem::replace(&mut *r.borrow_mut(), outer))
        .unwrap_or_default();
    tags.sort_unstable();
    tags.dedup();
    (result, tags)
}

/// Notes that a live key of `scope` was resolved (nothing when no [`recording`] is under way).
pub(super) fn note(scope: &str) {
    RESOLVED.with(|r| {
        if let Some(tags) = r.borrow_mut().as_mut() {
            tags.push(tag(scope));
        }
    });
}

/// [`note`] for a domain's key, its scope made only when a recording is under way.
pub(super) fn note_domain(domain: &str) {
    RESOLVED.with(|r| {
        if let Some(tags) = r.borrow_mut().as_mut() {
            tags.push(tag(&super::Keyring::domain_scope(domain)));
        }
    });
}

/// What became of a batch's keys since a given count of forgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// No forget since touched them; the count of forgets as checked, for the next check.
    Untouched(u64),
    /// A forget since may have destroyed one of them.
    Touched,
}

/// The forgets this process has seen, numbered, the last [`REMEMBERED`] with their scopes' tags.
#[derive(Default)]
pub struct ForgetLog {
    count: AtomicU64,
    recent: Mutex<VecDeque<(u64, u64)>>,
}

impl ForgetLog {
    /// Logs a forget of `scope`, once the caches no longer hold its keys.
    pub fn record(&self, scope: &str) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let number = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        recent.push_back((number, tag(scope)));
        if recent.len() > REMEMBERED {
            recent.pop_front();
        }
    }

    /// How many forgets were seen.
    pub fn seen(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Whether a forget seen after the first `seen` ones touched a scope of `tags` (sorted, as [`recording`] gives
    /// them).
    pub fn since(&self, seen: u64, tags: &[u64]) -> Since {
        if self.seen() == seen {
            return Since::Untouched(seen);
        }
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&(oldest, _)) = recent.front() else {
            return Since::Untouched(seen);
        };
        if oldest > seen + 1 {
            return Since::Touched;
        }
        // Numbers are consecutive: the forgets after `seen` start at its index.
        let mut checked = seen;
        let start = usize::try_from(seen + 1 - oldest).map_or(recent.len(), |i| i.min(recent.len()));
        for (number, forgotten) in recent.range(start..) {
            if tags.binary_search(forgotten).is_ok() {
                return Since::Touched;
            }
            checked = *number;
        }
        Since::Untouched(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_forget_of_a_resolved_scope_touches_a_batch() {
        let log = ForgetLog::default();
        let ((), tags) = recording(|| note("s:alice"));
        let seen = log.seen();
        log.record("s:bob");
        assert_eq!(log.since(seen, &tags), Since::Untouched(1));
        log.record("s:alice");
        assert_eq!(log.since(1, &tags), Since::Touched);
        assert_eq!(log.since(seen, &tags), Since::Touched);
    }

    #[test]
    fn a_recording_cut_short_by_a_panic_leaves_none_open() {
        let _ = std::panic::catch_unwind(|| recording(|| panic!("cut short")));
        note("s:alice");
        let ((), tags) = recording(|| ());
        assert!(tags.is_empty());
        RESOLVED.with(|r| assert!(r.borrow().is_none()));
    }

    #[test]
    fn a_batch_older_than_the_remembered_forgets_is_touched() {
        let log = ForgetLog::default();
        for i in 0..=REMEMBERED {
            log.record(&format!("s:{i}"));
        }
        assert_eq!(log.since(0, &[]), Since::Touched);
        assert!(matches!(log.since(1, &[]), Since::Untouched(_)));
    }

    #[test]
    fn nothing_is_noted_outside_a_recording() {
        note("s:alice");
        let ((), tags) = recording(|| ());
        assert!(tags.is_empty());
        let ((), tags) = recording(|| note_domain("x"));
        assert_eq!(tags, vec![tag("d:x")]);
    }

    #[test]
    fn tags_tell_scopes_apart_by_every_byte_and_length() {
        let scope = "s:4fGq0cW1hYd8ZbNq3yTt7rLm2vXk9PjEa1sD5uIo6Qw";
        let mut changed = scope.to_owned().into_bytes();
        changed[40] ^= 1;
        assert_ne!(tag(scope), tag(std::str::from_utf8(&changed).unwrap()));
        assert_ne!(tag("d:ab"), tag("d:ab\0"));
        assert_eq!(tag(scope), tag(scope));
    }
}
