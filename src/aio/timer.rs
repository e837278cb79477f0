//! Timers on three clocks, kept per context in deadline order.
//!
//! A [`Timer`] belongs to its context's home thread. Its deadline is an
//! absolute time in nanoseconds on its [`ClockType`]; `poll` sleeps until
//! the earliest deadline (no busy loop for a far timer) and runs expired
//! timers after the bottom halves and fd handlers, as QEMU's `aio_poll`.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::AioContext;

/// The clock a timer counts on (QEMU's `QEMUClockType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[doc(alias = "QEMUClockType")]
pub enum ClockType {
    /// Monotonic time (`CLOCK_MONOTONIC`), nanoseconds since an arbitrary
    /// point fixed when the process first reads it. QEMU's
    /// `QEMU_CLOCK_REALTIME`.
    Realtime,
    /// Wall-clock time, nanoseconds since the Unix epoch; may jump.
    /// QEMU's `QEMU_CLOCK_HOST`.
    Host,
    /// A per-context clock that only moves when advanced by hand with
    /// [`AioContext::advance_virtual_clock`]: deterministic tests.
    Virtual,
}

const CLOCKS: [ClockType; 3] = [ClockType::Realtime, ClockType::Host, ClockType::Virtual];

fn index(c: ClockType) -> usize {
    match c {
        ClockType::Realtime => 0,
        ClockType::Host => 1,
        ClockType::Virtual => 2,
    }
}

/// Nanoseconds on the monotonic clock since the process's base instant.
pub(crate) fn realtime_ns() -> i64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    Instant::now().duration_since(base).as_nanos() as i64
}

fn host_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

pub(crate) struct TimerNode {
    clock: ClockType,
    /// Deadline, or -1 when not armed.
    expire: Cell<i64>,
    /// Bumped on every mod/del: heap entries with an older value are stale.
    seq: Cell<u64>,
    /// The timer expired while its callback was running (a nested `poll`
    /// inside it, or a coroutine suspended inside it): it fires again once
    /// the callback returns, unless it is re-armed or deleted before.
    refire: Cell<bool>,
    cb: RefCell<Box<dyn FnMut()>>,
}

struct Entry {
    expire: i64,
    seq: u64,
    node: Rc<TimerNode>,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.expire, self.seq) == (o.expire, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.expire, self.seq).cmp(&(o.expire, o.seq))
    }
}

impl Entry {
    fn is_live(&self) -> bool {
        self.node.seq.get() == self.seq && self.node.expire.get() == self.expire
    }
}

/// The timers of one clock; home thread only.
#[derive(Default)]
pub(crate) struct TimerList {
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    armed: Cell<usize>,
}

pub(crate) struct Timers {
    lists: [TimerList; 3],
    seq: Cell<u64>,
    /// Set by `clear` (the context shut down): nothing is armed any more.
    closed: Cell<bool>,
}

impl Timers {
    pub(crate) fn new() -> Timers {
        Timers {
            lists: Default::default(),
            seq: Cell::new(0),
            closed: Cell::new(false),
        }
    }

    /// Whether no heap entry (live or stale) is left: nothing here holds a
    /// timer node, hence no callback.
    pub(crate) fn is_empty(&self) -> bool {
        self.lists.iter().all(|l| l.heap.borrow().is_empty())
    }

    fn next_seq(&self) -> u64 {
        let s = self.seq.get() + 1;
        self.seq.set(s);
        s
    }

    fn arm(&self, node: &Rc<TimerNode>, expire: i64) {
        if self.closed.get() {
            // Shut down: an entry added now would hold the callback in the
            // home-thread state after `clear` emptied it (see `clear`).
            return;
        }
        let list = &self.lists[index(node.clock)];
        if node.expire.get() < 0 {
            list.armed.set(list.armed.get() + 1);
        }
        let seq = self.next_seq();
        node.seq.set(seq);
        node.expire.set(expire);
        let mut heap = list.heap.borrow_mut();
        heap.push(Reverse(Entry {
            expire,
            seq,
            node: node.clone(),
        }));
        // Drop stale entries when they dominate.
        if heap.len() > 64 && heap.len() > 4 * list.armed.get() {
            heap.retain(|Reverse(e)| e.is_live());
        }
    }

    /// Disarms `node`, and drops a pending re-fire (a mod or a del
    /// replaces the expiry the running callback missed).
    fn disarm(&self, node: &TimerNode) {
        node.refire.set(false);
        if node.expire.get() >= 0 {
            let list = &self.lists[index(node.clock)];
            debug_assert!(list.armed.get() > 0, "armed timer count out of step");
            list.armed.set(list.armed.get().saturating_sub(1));
            node.expire.set(-1);
            node.seq.set(self.next_seq());
        }
    }

    /// The earliest live deadline of `clock`.
    /// Whether any timer of any clock is armed (a few loads: the idle
    /// `poll(false)` fast path asks this first).
    #[inline]
    pub(crate) fn any_armed(&self) -> bool {
        self.lists.iter().any(|l| l.armed.get() > 0)
    }

    fn deadline(&self, clock: ClockType) -> Option<i64> {
        let mut heap = self.lists[index(clock)].heap.borrow_mut();
        while let Some(Reverse(top)) = heap.peek() {
            if top.is_live() {
                return Some(top.expire);
            }
            heap.pop();
        }
        None
    }

    /// Nanoseconds until the first deadline of any clock: `Some(0)` if one
    /// expired, `None` if none is armed (or only virtual ones in the
    /// future, which only an explicit advance can reach).
    pub(crate) fn timeout_ns(&self, ctx: &AioContext) -> Option<i64> {
        let mut best: Option<i64> = None;
        for c in CLOCKS {
            if let Some(d) = self.deadline(c) {
                let left = (d - ctx.clock_ns(c)).max(0);
                if c == ClockType::Virtual && left > 0 {
                    continue;
                }
                best = Some(best.map_or(left, |b: i64| b.min(left)));
            }
        }
        best
    }

    /// Runs expired timers; returns whether any ran.
    ///
    /// A timer that expires while its callback is running (a nested `poll`
    /// inside the callback, or a coroutine suspended inside it) is not run
    /// again re-entrantly; it is marked `refire` and armed again when its
    /// callback returns, after the pass that ran that callback. It is not
    /// re-armed at `now` meanwhile: the callback may stay suspended for
    /// long, and a timer always due would keep `poll` from sleeping.
    pub(crate) fn run(&self, ctx: &AioContext) -> bool {
        if !self.any_armed() {
            return false;
        }
        let mut progress = false;
        for c in CLOCKS {
            if self.closed.get() {
                break; // a callback shut the context down: nothing runs
            }
            if self.lists[index(c)].armed.get() == 0 {
                continue;
            }
            let now = ctx.clock_ns(c);
            // Armed on drop, also if a callback unwinds out of this pass.
            let mut refire = Refire {
                timers: self,
                now,
                nodes: Vec::new(),
            };
            loop {
                if self.closed.get() {
                    break;
                }
                let node = {
                    let mut heap = self.lists[index(c)].heap.borrow_mut();
                    match heap.peek() {
                        Some(Reverse(top)) if !top.is_live() => {
                            heap.pop();
                            continue;
                        }
                        Some(Reverse(top)) if top.expire <= now => {
                            heap.pop().map(|Reverse(e)| e.node)
                        }
                        _ => None,
                    }
                };
                let Some(node) = node else { break };
                self.disarm(&node);
                match node.cb.try_borrow_mut() {
                    Ok(mut cb) => {
                        progress = true;
                        // If the timer expired again while `cb` ran, it is
                        // queued for re-arming when `cb` returns or unwinds.
                        let _returned = Returned {
                            node: &node,
                            refire: &mut refire.nodes,
                        };
                        cb();
                    }
                    // Its callback is running further up this thread's
                    // stack (or on a suspended coroutine's): fire again
                    // when it returns.
                    Err(_) => node.refire.set(true),
                };
            }
        }
        progress
    }

    /// Shutdown: disarms every timer, empties the heaps and refuses every
    /// later `arm`, so that no node (and no callback) is left in the
    /// home-thread state, which `Inner::drop` may reach off the home thread.
    /// Every node is disarmed before any entry is dropped: dropping one (a
    /// node whose handle is gone drops its callback here) may drop the
    /// handles of other timers, whose `del` must find them disarmed. Each
    /// destructor's panic is caught by `panics`.
    pub(crate) fn clear(&self, panics: &mut super::Panics) {
        self.closed.set(true);
        let mut entries = Vec::new();
        for l in &self.lists {
            entries.extend(std::mem::take(&mut *l.heap.borrow_mut()).into_vec());
            l.armed.set(0);
        }
        for Reverse(e) in &entries {
            if e.is_live() {
                e.node.expire.set(-1);
                e.node.seq.set(self.next_seq());
            }
            e.node.refire.set(false);
        }
        // The callbacks go now, on the home thread, even those whose node
        // a `Timer` handle keeps (a sleeping coroutine's own timer lives on
        // its stack): a wait's callback dropped unrun wakes its waiter,
        // which then finds the context dead instead of sleeping forever.
        for Reverse(e) in &entries {
            if let Ok(mut cb) = e.node.cb.try_borrow_mut() {
                let old = std::mem::replace(&mut *cb, Box::new(|| {}));
                drop(cb);
                panics.catch(|| drop(old));
            }
        }
        for e in entries {
            panics.catch(|| drop(e));
        }
    }
}

/// Timers whose callback returned (or unwound) after they expired again
/// meanwhile; armed at `now` when the pass that ran them ends.
struct Refire<'a> {
    timers: &'a Timers,
    now: i64,
    nodes: Vec<Rc<TimerNode>>,
}

impl Drop for Refire<'_> {
    fn drop(&mut self) {
        for node in self.nodes.drain(..) {
            // Not if re-armed or deleted since (`disarm` clears `refire`),
            // nor on a closed `Timers` (`arm` refuses).
            if node.refire.replace(false) && node.expire.get() < 0 {
                self.timers.arm(&node, self.now);
            }
        }
    }
}

/// Queues a timer whose callback returns or unwinds for its re-fire, if it
/// expired while the callback ran.
struct Returned<'a> {
    node: &'a Rc<TimerNode>,
    refire: &'a mut Vec<Rc<TimerNode>>,
}

impl Drop for Returned<'_> {
    fn drop(&mut self) {
        if self.node.refire.get() {
            self.refire.push(self.node.clone());
        }
    }
}

/// A timer on a context (QEMU's `QEMUTimer`): runs its callback on the
/// home thread once its deadline passes. `!Send`; dropping it deletes it.
///
/// A callback is never re-entered: if the timer expires again while its
/// callback runs (the callback re-armed it and polls the context, or a
/// coroutine suspended inside it), it fires once more when the callback
/// returns, unless it is re-armed or deleted before. Meanwhile it is not
/// [pending](Self::is_pending). After [`AioContext::shutdown`] a timer is
/// disarmed and cannot be armed again; if it was armed, its callback (and
/// what it captured) was dropped by the shutdown, on the home thread.
///
/// Its callback need not be `Send`, so the timer stays on the home thread:
///
/// ```compile_fail,E0277
/// use coroloop::aio::{AioContext, ClockType};
///
/// let ctx = AioContext::new().unwrap();
/// let timer = ctx.timer_new(ClockType::Virtual, || ());
/// std::thread::spawn(move || timer.mod_ns(0));
/// ```
///
/// # Examples
///
/// ```
/// use coroloop::aio::{AioContext, ClockType};
/// use std::{cell::Cell, rc::Rc};
///
/// let ctx = AioContext::new()?;
/// let fired = Rc::new(Cell::new(0));
/// let f = fired.clone();
/// let timer = ctx.timer_new(ClockType::Virtual, move || f.set(f.get() + 1));
/// timer.mod_ns(ctx.clock_ns(ClockType::Virtual) + 1_000);
/// assert!(!ctx.poll(false));
/// ctx.advance_virtual_clock(1_000);
/// assert!(ctx.poll(false));
/// assert_eq!(fired.get(), 1);
/// assert_eq!(timer.expire_time(), None);
/// # std::io::Result::Ok(())
/// ```
#[doc(alias = "QEMUTimer")]
pub struct Timer {
    node: Rc<TimerNode>,
    ctx: AioContext,
}

impl Timer {
    /// Arms the timer for the absolute time `expire_ns` on its clock
    /// (re-arms it if armed). A time in the past fires on the next poll.
    #[doc(alias = "timer_mod")]
    #[doc(alias = "timer_mod_ns")]
    pub fn mod_ns(&self, expire_ns: i64) {
        if self.ctx.inner.is_dead() {
            return; // shut down: timers no longer fire
        }
        let t = self.ctx.inner.timers();
        t.disarm(&self.node);
        t.arm(&self.node, expire_ns.max(0));
        // An outer loop that prepared to sleep with the old deadline
        // (`prepare`, `run_in_smol`) computes the new one.
        self.ctx.inner.notify_home();
    }

    /// Arms the timer `d` from now on its clock.
    pub fn mod_after(&self, d: Duration) {
        let now = self.ctx.clock_ns(self.node.clock);
        self.mod_ns(now.saturating_add(d.as_nanos().min(i64::MAX as u128) as i64));
    }

    /// Arms the timer for `expire_ns` only if that is earlier than its
    /// current deadline (or it is not armed).
    #[doc(alias = "timer_mod_anticipate")]
    #[doc(alias = "timer_mod_anticipate_ns")]
    pub fn mod_anticipate(&self, expire_ns: i64) {
        match self.expire_time() {
            Some(cur) if cur <= expire_ns => {}
            _ => self.mod_ns(expire_ns),
        }
    }

    /// Disarms the timer (also an expiry missed while its callback was
    /// running, which would otherwise fire when the callback returns).
    #[doc(alias = "timer_del")]
    pub fn del(&self) {
        self.ctx.inner.timers().disarm(&self.node);
    }

    /// The deadline, if armed.
    #[doc(alias = "timer_expire_time_ns")]
    pub fn expire_time(&self) -> Option<i64> {
        let e = self.node.expire.get();
        (e >= 0).then_some(e)
    }

    /// Whether the timer is armed.
    #[doc(alias = "timer_pending")]
    pub fn is_pending(&self) -> bool {
        self.node.expire.get() >= 0
    }

    /// The timer's clock.
    pub fn clock(&self) -> ClockType {
        self.node.clock
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // After shutdown too: shutdown disarmed the node, and a re-fire
        // pending since is dropped with the handle.
        self.del();
        // Stale heap entries may keep the node a while (lazy deletion);
        // drop the callback and what it owns now. A callback that drops its
        // own timer is running (borrowed): it goes with the node instead.
        if let Ok(mut cb) = self.node.cb.try_borrow_mut() {
            *cb = Box::new(|| {});
        }
    }
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer")
            .field("clock", &self.node.clock)
            .field("expire", &self.expire_time())
            .finish()
    }
}

impl AioContext {
    /// Creates a disarmed timer on `clock` that runs `f` when it expires
    /// (QEMU's `aio_timer_new`).
    ///
    /// # Panics
    ///
    /// Panics if called off the context's home thread.
    #[doc(alias = "aio_timer_new")]
    #[doc(alias = "aio_timer_init")]
    #[track_caller]
    pub fn timer_new<F>(&self, clock: ClockType, f: F) -> Timer
    where
        F: FnMut() + 'static,
    {
        self.inner.assert_home("AioContext::timer_new");
        Timer {
            node: Rc::new(TimerNode {
                clock,
                expire: Cell::new(-1),
                seq: Cell::new(0),
                refire: Cell::new(false),
                cb: RefCell::new(Box::new(f)),
            }),
            ctx: self.clone(),
        }
    }

    /// Reads `clock` in nanoseconds (the virtual clock of this context for
    /// [`ClockType::Virtual`]).
    #[doc(alias = "qemu_clock_get_ns")]
    pub fn clock_ns(&self, clock: ClockType) -> i64 {
        match clock {
            ClockType::Realtime => realtime_ns(),
            ClockType::Host => host_ns(),
            ClockType::Virtual => self
                .inner
                .virtual_ns
                .load(std::sync::atomic::Ordering::Acquire),
        }
    }

    /// Moves this context's virtual clock forward by `ns` and wakes its
    /// loop, so virtual timers that expired run on its next poll. Any
    /// thread.
    pub fn advance_virtual_clock(&self, ns: i64) {
        assert!(
            ns >= 0,
            "AioContext::advance_virtual_clock: negative step {ns}"
        );
        self.inner
            .virtual_ns
            .fetch_add(ns, std::sync::atomic::Ordering::AcqRel);
        self.inner.notify();
    }
}
