//! Programs: what the fuzzer runs, generated from a seed, pruned by the
//! shrinker and printed as Rust for the regression tests.

/// How many worker threads a program runs on (IoThreads come on top).
pub(crate) const THREADS: u8 = 3;

/// One API call (or a short sequence the docs present as one step), with
/// the slots it works on. Slots index per-thread tables (`c` contexts,
/// `s` handles of the op's kind) or program-wide ones (`m` mutexes, `k`
/// sleeps/signals, `p` pipes, `x` the exchange of `Send` handles between
/// threads). A `body` runs inside the callback, coroutine or future the op
/// creates.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Op {
    // ---- anywhere: top level, callbacks, coroutines
    Poll {
        c: u8,
        blocking: bool,
    },
    CtxNew {
        c: u8,
        uring: bool,
    },
    CtxShutdown {
        c: u8,
    },
    CtxDrop {
        c: u8,
    },
    CoNew {
        s: u8,
        body: Vec<Op>,
    },
    CoEnter {
        s: u8,
    },
    CoWake {
        s: u8,
    },
    CoSchedule {
        s: u8,
        c: u8,
    },
    CoDetach {
        s: u8,
    },
    CoCancel {
        s: u8,
    },
    CoDrop {
        s: u8,
    },
    BhNew {
        s: u8,
        c: u8,
        local: bool,
        body: Vec<Op>,
    },
    BhSchedule {
        s: u8,
    },
    BhCancel {
        s: u8,
    },
    BhDrop {
        s: u8,
    },
    BhOneshot {
        c: u8,
        body: Vec<Op>,
    },
    TimerNew {
        s: u8,
        c: u8,
        body: Vec<Op>,
    },
    TimerMod {
        s: u8,
        us: u16,
    },
    TimerDel {
        s: u8,
    },
    TimerDrop {
        s: u8,
    },
    FdAdd {
        s: u8,
        c: u8,
        body: Vec<Op>,
    },
    FdModify {
        s: u8,
    },
    FdRemove {
        s: u8,
    },
    Spawn {
        s: u8,
        c: u8,
        yields: u8,
        body: Vec<Op>,
    },
    SpawnLocal {
        s: u8,
        c: u8,
        body: Vec<Op>,
    },
    SpawnCoroutine {
        s: u8,
        c: u8,
        body: Vec<Op>,
    },
    TaskDrop {
        s: u8,
    },
    TaskDetach {
        s: u8,
    },
    SmolSpawn {
        body: Vec<Op>,
    },
    SmolTick {
        n: u8,
    },
    BlockOn {
        c: u8,
        body: Vec<Op>,
    },
    Signal {
        k: u8,
    },
    CoSleepWake {
        k: u8,
    },
    QueueNext,
    QueueRestartAll,
    Export {
        what: u8,
        s: u8,
        x: u8,
    },
    ImportDrop {
        x: u8,
    },
    ImportUse {
        x: u8,
    },
    IoThreadNew {
        i: u8,
    },
    IoThreadRun {
        i: u8,
        body: Vec<Op>,
    },
    IoThreadStop {
        i: u8,
    },
    IoThreadDrop {
        i: u8,
    },
    /// Misuse on purpose: a call the docs say panics, with their message.
    Misuse {
        which: u8,
    },
    // ---- inside a coroutine only
    Suspend,
    Yield,
    Sleep {
        us: u16,
    },
    CoSleepWait {
        k: u8,
        us: Option<u16>,
    },
    Lock {
        m: u8,
        body: Vec<Op>,
    },
    Read {
        body: Vec<Op>,
    },
    Write {
        body: Vec<Op>,
    },
    QueueWait,
    AwaitSignal {
        k: u8,
    },
    AwaitTask {
        s: u8,
        fallible: bool,
    },
    PipeRead {
        how: u8,
    },
    FileRead {
        how: u8,
    },
    PoolWork {
        us: u16,
    },
    Join {
        s: u8,
    },
    LockTimeout {
        m: u8,
        us: u16,
        body: Vec<Op>,
    },
    QueueWaitTimeout {
        us: u16,
    },
    Panic,
    // ---- top level only
    ThreadExit,
}

/// A program: top-level steps, each run by one worker thread, one at a
/// time (the conductor waits for each step to finish), then each worker's
/// ending (`finish`: 0 shuts its contexts down and drops its handles, 1
/// drops its handles, 2 leaves them to the thread's exit).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Program {
    pub(crate) steps: Vec<(u8, Op)>,
    pub(crate) finish: [u8; THREADS as usize],
}

/// What may appear in a body.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Kind {
    Top,
    /// A BH, timer or fd callback, or a `Send` future: not in a coroutine.
    Callback,
    /// A coroutine that may wait for anything.
    Coroutine,
    /// A coroutine something waits for (`block_on`): no wait that only
    /// another step could end, and so for what it creates.
    Bounded,
    /// A callback created under a `Bounded` coroutine (what it creates
    /// may be taken over by the future `block_on` waits for).
    BoundedCallback,
}

/// splitmix64: small, fast, and good enough for choosing ops.
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn u8(&mut self, n: u8) -> u8 {
        self.below(n as u64) as u8
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The seed of program `index` of a run with seed `base`.
pub(crate) fn program_seed(base: u64, index: u64) -> u64 {
    let mut r = Rng::new(base ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    r.next()
}

pub(crate) const CTXS: u8 = 2;
pub(crate) const COS: u8 = 4;
pub(crate) const BHS: u8 = 3;
pub(crate) const TIMERS: u8 = 3;
pub(crate) const FDS: u8 = 2;
pub(crate) const TASKS: u8 = 3;
pub(crate) const IOTHREADS: u8 = 1;
pub(crate) const EXCHANGE: u8 = 4;
pub(crate) const MUTEXES: u8 = 2;
pub(crate) const SLEEPS: u8 = 2;
pub(crate) const SIGNALS: u8 = 2;

const MAX_DEPTH: u32 = 3;

pub(crate) fn generate(seed: u64) -> Program {
    let mut r = Rng::new(seed);
    let n = 30 + r.below(170) as usize;
    let steps = (0..n)
        .map(|_| {
            let t = r.u8(THREADS);
            (t, gen_op(&mut r, Kind::Top, 0))
        })
        .collect();
    let finish = [r.u8(3), r.u8(3), r.u8(3)];
    Program { steps, finish }
}

fn gen_body(r: &mut Rng, kind: Kind, depth: u32) -> Vec<Op> {
    if depth >= MAX_DEPTH {
        return Vec::new();
    }
    let n = r.below(if depth == 0 { 5 } else { 3 }) as usize;
    (0..n).map(|_| gen_op(r, kind, depth + 1)).collect()
}

fn gen_op(r: &mut Rng, kind: Kind, depth: u32) -> Op {
    let in_co = matches!(kind, Kind::Coroutine | Kind::Bounded);
    // Under a `block_on`, everything created must end by itself: a
    // `CoroutineFuture` completes only once the coroutines it took over
    // (created inside it, then detached or dropped) have finished.
    let bounded = matches!(kind, Kind::Bounded | Kind::BoundedCallback);
    let co_kind = if bounded {
        Kind::Bounded
    } else {
        Kind::Coroutine
    };
    let cb_kind = if bounded {
        Kind::BoundedCallback
    } else {
        Kind::Callback
    };
    // Coroutine-only ops first, a third of the time inside coroutines.
    if in_co && r.chance(35) {
        loop {
            let op = match r.below(19) {
                0 if !bounded => Op::Suspend,
                1 => Op::Yield,
                2 => Op::Sleep {
                    us: r.below(300) as u16,
                },
                3 => Op::CoSleepWait {
                    k: r.u8(SLEEPS),
                    us: if bounded || r.chance(50) {
                        Some(r.below(400) as u16)
                    } else {
                        None
                    },
                },
                4 if !bounded => Op::Lock {
                    m: r.u8(MUTEXES),
                    body: gen_body(r, Kind::Coroutine, depth),
                },
                5 if !bounded => Op::Read {
                    body: gen_body(r, Kind::Coroutine, depth),
                },
                6 if !bounded => Op::Write {
                    body: gen_body(r, Kind::Coroutine, depth),
                },
                7 if !bounded => Op::QueueWait,
                8 if !bounded => Op::AwaitSignal { k: r.u8(SIGNALS) },
                9 if !bounded => Op::AwaitTask {
                    s: r.u8(TASKS),
                    fallible: r.chance(50),
                },
                10 | 11 if !bounded => Op::PipeRead { how: r.u8(4) },
                12 => Op::FileRead { how: r.u8(3) },
                13 => Op::PoolWork {
                    us: r.below(200) as u16,
                },
                14 if r.chance(10) => Op::Panic,
                15 if !bounded => Op::Lock {
                    m: r.u8(MUTEXES),
                    body: vec![Op::Yield],
                },
                16 if !bounded => Op::Join { s: r.u8(COS) },
                17 => Op::LockTimeout {
                    m: r.u8(MUTEXES),
                    us: r.below(500) as u16,
                    body: gen_body(r, co_kind, depth),
                },
                18 => Op::QueueWaitTimeout {
                    us: r.below(500) as u16,
                },
                _ => continue,
            };
            return op;
        }
    }
    let top = kind == Kind::Top;
    loop {
        let op = match r.below(46) {
            0..=2 => Op::Poll {
                c: r.u8(CTXS),
                blocking: r.chance(30),
            },
            3 => Op::CtxNew {
                c: r.u8(CTXS),
                uring: r.chance(30),
            },
            4 if r.chance(40) => Op::CtxShutdown { c: r.u8(CTXS) },
            5 if r.chance(40) => Op::CtxDrop { c: r.u8(CTXS) },
            6..=8 => Op::CoNew {
                s: r.u8(COS),
                body: gen_body(r, co_kind, depth),
            },
            9 | 10 => Op::CoEnter { s: r.u8(COS) },
            11 | 12 => Op::CoWake { s: r.u8(COS) },
            13 => Op::CoSchedule {
                s: r.u8(COS),
                c: r.u8(CTXS),
            },
            14 => Op::CoDetach { s: r.u8(COS) },
            15 => Op::CoCancel { s: r.u8(COS) },
            16 => Op::CoDrop { s: r.u8(COS) },
            17 => Op::BhNew {
                s: r.u8(BHS),
                c: r.u8(CTXS),
                local: r.chance(50),
                body: gen_body(r, cb_kind, depth),
            },
            18 | 19 => Op::BhSchedule { s: r.u8(BHS) },
            20 => {
                if r.chance(50) {
                    Op::BhCancel { s: r.u8(BHS) }
                } else {
                    Op::BhDrop { s: r.u8(BHS) }
                }
            }
            21 => Op::BhOneshot {
                c: r.u8(CTXS),
                body: gen_body(r, cb_kind, depth),
            },
            22 => Op::TimerNew {
                s: r.u8(TIMERS),
                c: r.u8(CTXS),
                body: gen_body(r, cb_kind, depth),
            },
            23 | 24 => Op::TimerMod {
                s: r.u8(TIMERS),
                us: r.below(500) as u16,
            },
            25 => {
                if r.chance(50) {
                    Op::TimerDel { s: r.u8(TIMERS) }
                } else {
                    Op::TimerDrop { s: r.u8(TIMERS) }
                }
            }
            26 => Op::FdAdd {
                s: r.u8(FDS),
                c: r.u8(CTXS),
                body: gen_body(r, cb_kind, depth),
            },
            27 => {
                if r.chance(50) {
                    Op::FdModify { s: r.u8(FDS) }
                } else {
                    Op::FdRemove { s: r.u8(FDS) }
                }
            }
            28 => Op::Spawn {
                s: r.u8(TASKS),
                c: r.u8(CTXS),
                yields: r.u8(4),
                body: gen_body(r, cb_kind, depth),
            },
            29 => Op::SpawnLocal {
                s: r.u8(TASKS),
                c: r.u8(CTXS),
                body: gen_body(r, co_kind, depth),
            },
            30 => Op::SpawnCoroutine {
                s: r.u8(TASKS),
                c: r.u8(CTXS),
                body: gen_body(r, co_kind, depth),
            },
            31 => {
                if r.chance(50) {
                    Op::TaskDrop { s: r.u8(TASKS) }
                } else {
                    Op::TaskDetach { s: r.u8(TASKS) }
                }
            }
            32 => Op::SmolSpawn {
                body: gen_body(r, co_kind, depth),
            },
            33 => Op::SmolTick { n: 1 + r.u8(4) },
            34 if !in_co => Op::BlockOn {
                c: r.u8(CTXS),
                body: gen_body(r, Kind::Bounded, depth),
            },
            35 => Op::Signal { k: r.u8(SIGNALS) },
            36 => Op::CoSleepWake { k: r.u8(SLEEPS) },
            37 => {
                if r.chance(50) {
                    Op::QueueNext
                } else {
                    Op::QueueRestartAll
                }
            }
            38 | 39 => Op::Export {
                what: r.u8(5),
                s: r.u8(COS.max(TASKS)),
                x: r.u8(EXCHANGE),
            },
            40 => Op::ImportDrop { x: r.u8(EXCHANGE) },
            41 => Op::ImportUse { x: r.u8(EXCHANGE) },
            42 if top => match r.below(4) {
                0 => Op::IoThreadNew { i: r.u8(IOTHREADS) },
                1 => Op::IoThreadRun {
                    i: r.u8(IOTHREADS),
                    body: gen_body(r, cb_kind, depth),
                },
                2 => Op::IoThreadStop { i: r.u8(IOTHREADS) },
                _ => Op::IoThreadDrop { i: r.u8(IOTHREADS) },
            },
            43 if top && r.chance(15) => Op::ThreadExit,
            44 if r.chance(20) => Op::Misuse { which: r.u8(4) },
            45 if top => Op::IoThreadRun {
                i: r.u8(IOTHREADS),
                body: gen_body(r, cb_kind, depth),
            },
            _ => continue,
        };
        return op;
    }
}

/// How many ops `p` has, nested ones included (the shrinker deletes them
/// by their preorder ids).
pub(crate) fn count_nodes(p: &Program) -> usize {
    fn count(ops: &[Op]) -> usize {
        ops.iter()
            .map(|op| 1 + body_of(op).map_or(0, |b| count(b)))
            .sum()
    }
    p.steps
        .iter()
        .map(|(_, op)| 1 + body_of(op).map_or(0, |b| count(b)))
        .sum()
}

pub(crate) fn body_of(op: &Op) -> Option<&Vec<Op>> {
    match op {
        Op::CoNew { body, .. }
        | Op::BhNew { body, .. }
        | Op::BhOneshot { body, .. }
        | Op::TimerNew { body, .. }
        | Op::FdAdd { body, .. }
        | Op::Spawn { body, .. }
        | Op::SpawnLocal { body, .. }
        | Op::SpawnCoroutine { body, .. }
        | Op::SmolSpawn { body }
        | Op::BlockOn { body, .. }
        | Op::IoThreadRun { body, .. }
        | Op::Lock { body, .. }
        | Op::LockTimeout { body, .. }
        | Op::Read { body }
        | Op::Write { body } => Some(body),
        _ => None,
    }
}

fn body_of_mut(op: &mut Op) -> Option<&mut Vec<Op>> {
    match op {
        Op::CoNew { body, .. }
        | Op::BhNew { body, .. }
        | Op::BhOneshot { body, .. }
        | Op::TimerNew { body, .. }
        | Op::FdAdd { body, .. }
        | Op::Spawn { body, .. }
        | Op::SpawnLocal { body, .. }
        | Op::SpawnCoroutine { body, .. }
        | Op::SmolSpawn { body }
        | Op::BlockOn { body, .. }
        | Op::IoThreadRun { body, .. }
        | Op::Lock { body, .. }
        | Op::LockTimeout { body, .. }
        | Op::Read { body }
        | Op::Write { body } => Some(body),
        _ => None,
    }
}

/// `p` without the nodes whose preorder ids are in `deleted` (a deleted
/// node goes with its body).
pub(crate) fn prune(p: &Program, deleted: &[usize]) -> Program {
    fn walk(ops: &mut Vec<Op>, next: &mut usize, deleted: &[usize]) {
        let mut keep = Vec::with_capacity(ops.len());
        for mut op in ops.drain(..) {
            let id = *next;
            *next += 1;
            let subtree = body_of(&op).map_or(0, |b| count_all(b));
            if deleted.contains(&id) {
                *next += subtree;
                continue;
            }
            if let Some(b) = body_of_mut(&mut op) {
                walk(b, next, deleted);
            }
            keep.push(op);
        }
        *ops = keep;
    }
    fn count_all(ops: &[Op]) -> usize {
        ops.iter()
            .map(|op| 1 + body_of(op).map_or(0, |b| count_all(b)))
            .sum()
    }
    let mut out = p.clone();
    let mut next = 0;
    let mut steps = Vec::new();
    for (t, mut op) in out.steps.drain(..) {
        let id = next;
        next += 1;
        let subtree = body_of(&op).map_or(0, |b| count_all(b));
        if deleted.contains(&id) {
            next += subtree;
            continue;
        }
        if let Some(b) = body_of_mut(&mut op) {
            walk(b, &mut next, deleted);
        }
        steps.push((t, op));
    }
    out.steps = steps;
    out
}

/// The ids of the top-level steps (for the shrinker's first pass).
pub(crate) fn top_ids(p: &Program) -> Vec<usize> {
    let mut ids = Vec::new();
    let mut next = 0;
    for (_, op) in &p.steps {
        ids.push(next);
        next += 1 + body_of(op).map_or(0, |b| {
            fn c(ops: &[Op]) -> usize {
                ops.iter()
                    .map(|op| 1 + body_of(op).map_or(0, |b| c(b)))
                    .sum()
            }
            c(b)
        });
    }
    ids
}

/// `p` as Rust source for `tests/api_fuzz/regressions.rs`.
pub(crate) fn to_rust(p: &Program) -> String {
    let mut s = String::from("Program {\n    steps: vec![\n");
    for (t, op) in &p.steps {
        s.push_str(&format!("        ({t}, {}),\n", op_to_rust(op)));
    }
    s.push_str(&format!("    ],\n    finish: {:?},\n}}", p.finish));
    s
}

/// `Debug` output turned into an expression: variants get `Op::`, lists
/// become `vec![...]`.
fn op_to_rust(op: &Op) -> String {
    let d = format!("{op:?}");
    let mut out = String::with_capacity(d.len() * 2);
    let b = d.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let ch = b[i] as char;
        if ch == '[' {
            out.push_str("vec![");
            i += 1;
        } else if ch.is_ascii_uppercase() && (i == 0 || !(b[i - 1] as char).is_ascii_alphanumeric())
        {
            let start = i;
            while i < b.len() && (b[i] as char).is_ascii_alphanumeric() {
                i += 1;
            }
            let word = &d[start..i];
            if word != "None" && word != "Some" {
                out.push_str("Op::");
            }
            out.push_str(word);
        } else {
            out.push(ch);
            i += 1;
        }
    }
    out
}
