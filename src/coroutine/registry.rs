//! The coroutines a resumer resumes: an intrusive list per resumer, so
//! that a context's shutdown or a `CoroutineFuture`'s drop can cancel
//! every coroutine it resumes, whoever owns it (ARCHITECTURE.md, "Who owns a
//! coroutine"): a coroutine whose resumer is gone could never be resumed
//! again.
//!
//! Every coroutine with a resumer is linked into its resumer's list from
//! creation until it finishes (or is leaked); linking and unlinking are a
//! few pointer stores on the home thread, no allocation. A list is closed
//! when its resumer ends: a coroutine created with a closed resumer is
//! cancelled at its first suspension.

use std::cell::Cell;
use std::ptr;

use super::header::Header;

/// A node of a resumer's list, embedded in each header (and the list's
/// sentinel). Home thread only.
pub(crate) struct Links {
    prev: Cell<*const Links>,
    next: Cell<*const Links>,
    /// The header this node is embedded in (null for a sentinel).
    owner: Cell<*const Header>,
}

impl Links {
    pub(crate) const fn new() -> Links {
        Links {
            prev: Cell::new(ptr::null()),
            next: Cell::new(ptr::null()),
            owner: Cell::new(ptr::null()),
        }
    }

    pub(crate) fn set_owner(&self, h: *const Header) {
        self.owner.set(h);
    }

    pub(crate) fn is_linked(&self) -> bool {
        !self.next.get().is_null()
    }

    /// Inserts `self` (unlinked) right after `at` (linked, or a sentinel).
    fn insert_after(&self, at: &Links) {
        debug_assert!(!self.is_linked());
        let next = at.next.get();
        self.prev.set(at);
        self.next.set(next);
        // SAFETY: `next` is a linked node (or the sentinel) of the same
        // list, alive: nodes unlink themselves before their header is
        // recycled, and a sentinel outlives its list's nodes.
        unsafe { (*next).prev.set(self) };
        at.next.set(self);
    }

    /// Unlinks `self` if it is linked.
    #[inline(always)]
    pub(crate) fn unlink(&self) {
        if self.next.get().is_null() {
            return; // a bare coroutine: the common fast path
        }
        self.unlink_linked();
    }

    #[inline(never)]
    fn unlink_linked(&self) {
        let next = self.next.get();
        let prev = self.prev.get();
        // SAFETY: neighbours of a linked node are linked nodes or the
        // sentinel of the same list, alive (see `insert_after`).
        unsafe {
            (*prev).next.set(next);
            (*next).prev.set(prev);
        }
        self.prev.set(ptr::null());
        self.next.set(ptr::null());
    }
}

/// The list of the coroutines one resumer resumes.
pub(crate) struct CoList {
    /// Inline (no allocation per resumer): it points to itself only from
    /// the first `link` on, when the list sits at its final address inside
    /// its resumer's `Arc` (a `CoList` is never moved once linked into).
    sentinel: Links,
    closed: Cell<bool>,
}

// SAFETY: a `CoList` lives in a resumer (`Send + Sync`) but is only
// touched on the resumer's home thread (coroutine creation, finish, drop
// of handles, shutdown: all home-thread operations, as the headers'
// `Cell` fields are).
unsafe impl Send for CoList {}
// SAFETY: as above.
unsafe impl Sync for CoList {}

impl CoList {
    pub(crate) fn new() -> CoList {
        CoList {
            sentinel: Links::new(),
            closed: Cell::new(false),
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Links `h` (a new coroutine of this resumer). A coroutine joining a
    /// closed list is cancelled at its first suspension.
    pub(crate) fn link(&self, h: &Header) {
        if self.closed.get() {
            h.cancelling.set(true);
        }
        if !self.sentinel.is_linked() {
            let p: *const Links = &self.sentinel;
            self.sentinel.prev.set(p);
            self.sentinel.next.set(p);
        }
        h.links.insert_after(&self.sentinel);
    }

    /// Closes the list and cancels every coroutine in it: suspended ones
    /// are unwound now (or leaked where they cannot be, see `unwind_cmd`),
    /// fresh ones are dropped without running, and those on the current
    /// call chain unwind at their next suspension. Returns the first panic
    /// a destructor raised meanwhile.
    pub(crate) fn cancel_all(&self) -> Option<Box<dyn std::any::Any + Send>> {
        self.closed.set(true);
        let mut first = None;
        let end: *const Links = &self.sentinel;
        if !self.sentinel.is_linked() {
            return None; // nothing was ever linked
        }
        loop {
            let mut n = self.sentinel.next.get();
            let mut target = None;
            while n != end {
                // SAFETY: a linked node of this list, alive.
                let links = unsafe { &*n };
                // SAFETY: a linked node's owner is a live header.
                let h = unsafe { &*links.owner.get() };
                if h.state.get() == super::State::Running {
                    // On the call chain: unwinds at its next suspension.
                    h.cancelling.set(true);
                    n = links.next.get();
                } else {
                    target = Some(h);
                    break;
                }
            }
            let Some(h) = target else { break };
            // Held until it is unlinked: its unwind may drop its last
            // handle (an owner's), which would otherwise recycle it under us.
            let hold = super::header::WeakRef::new(h);
            if let Some(p) = super::cancel_header(h) {
                if first.is_none() {
                    first = Some(p);
                } else {
                    log::error!("coroloop: a second panic while cancelling coroutines; dropped");
                }
            }
            // `cancel_header` finished (and so unlinked) `h`; if it could
            // not, unlink it so the loop ends.
            h.links.unlink();
            drop(hold);
        }
        first
    }
}

impl Drop for CoList {
    fn drop(&mut self) {
        // Every coroutine holds its resumer (and so this list) until it
        // finishes and unlinks: nothing can be linked here any more.
        debug_assert!(
            !self.sentinel.is_linked() || std::ptr::eq(self.sentinel.next.get(), &self.sentinel)
        );
    }
}
