//! Programs the fuzzer found failing, shrunk and printed by it (see
//! RELIABILITY.md, "API fuzzer"), each with the fix it led to.

#[allow(unused_imports)]
use crate::program::{Op, Program};

pub(crate) fn programs() -> Vec<(&'static str, Program)> {
    vec![
        // Program seed 2006035941381092928: a LocalBh dropped (its node on
        // the home list until the next poll) on a context whose last
        // handle then went on another thread. The node and its callback
        // were leaked without a log line; now the drop reports "bottom
        // halves" among what it leaks.
        (
            "local BH left on a context dropped off its home thread",
            Program {
                steps: vec![
                    (
                        1,
                        Op::BhNew {
                            s: 0,
                            c: 0,
                            local: true,
                            body: vec![],
                        },
                    ),
                    (
                        1,
                        Op::Export {
                            what: 0,
                            s: 0,
                            x: 1,
                        },
                    ),
                ],
                finish: [0, 1, 0],
            },
        ),
        // Program seed 1331215098954318762: a spawn_local task whose
        // coroutine holds a handle of its own context (taken with
        // `AioContext::current()` for an io_uring read) keeps the context
        // alive through its thread's exit: a cycle, leaked without a word.
        // Now the thread's teardown logs every live context that was not
        // shut down and still holds tasks, callbacks or coroutines.
        (
            "context kept alive by its own task through thread exit",
            Program {
                steps: vec![
                    (
                        1,
                        Op::SpawnLocal {
                            s: 2,
                            c: 0,
                            body: vec![Op::PipeRead { how: 1 }],
                        },
                    ),
                    (
                        1,
                        Op::CoNew {
                            s: 0,
                            body: vec![Op::Poll {
                                c: 0,
                                blocking: false,
                            }],
                        },
                    ),
                    (1, Op::CoEnter { s: 0 }),
                ],
                finish: [0, 2, 0],
            },
        ),
        // Program seed 18249969999573282947: `block_on` of a
        // CoroutineFuture built outside any loop on a thread whose default
        // context is another one: its sleep's timer went to the default
        // context, which nothing polled, and `block_on` hung. Now the
        // context that first polls the future serves it.
        (
            "block_on of a CoroutineFuture built outside it",
            Program {
                steps: vec![
                    (1, Op::CtxNew { c: 1, uring: false }),
                    (
                        1,
                        Op::BlockOn {
                            c: 1,
                            body: vec![Op::Sleep { us: 64 }],
                        },
                    ),
                ],
                finish: [0, 2, 2],
            },
        ),
        // Program seed 8454365929731295474: a coroutine's blocking poll of
        // a shut-down context slept until a notify nothing would send. A
        // blocking poll of a shut-down context returns at once now.
        (
            "blocking poll of a shut-down context",
            Program {
                steps: vec![
                    (1, Op::CtxShutdown { c: 0 }),
                    (
                        1,
                        Op::CoNew {
                            s: 1,
                            body: vec![Op::Poll {
                                c: 0,
                                blocking: true,
                            }],
                        },
                    ),
                    (1, Op::CoWake { s: 1 }),
                ],
                finish: [1, 2, 1],
            },
        ),
        // Program seed 6510184892687580034: a coroutine created and
        // detached inside a `block_on`'s CoroutineFuture was taken over but
        // never started, and the future waited for it forever. A detached
        // fresh coroutine starts at its resumer's next pass now.
        (
            "fresh coroutine detached inside a CoroutineFuture",
            Program {
                steps: vec![(
                    2,
                    Op::BlockOn {
                        c: 0,
                        body: vec![Op::CoNew { s: 0, body: vec![] }, Op::CoDetach { s: 0 }],
                    },
                )],
                finish: [1, 0, 1],
            },
        ),
        // Program seed 8829696300826754488: `Coroutine::join` kept a handle
        // of the joiner on its own stack while it waited, so dropping every
        // other handle (its default context shut down: a bare coroutine)
        // neither handed it over nor cancelled it: both coroutines leaked
        // silently. The joiner holds no handle of itself now.
        (
            "a joiner kept alive by its own handle",
            Program {
                steps: vec![
                    (0, Op::CtxNew { c: 0, uring: false }),
                    (0, Op::CoNew { s: 2, body: vec![] }),
                    (
                        0,
                        Op::SpawnCoroutine {
                            s: 1,
                            c: 0,
                            body: vec![Op::CoWake { s: 3 }],
                        },
                    ),
                    (
                        0,
                        Op::CoNew {
                            s: 3,
                            body: vec![Op::Join { s: 2 }],
                        },
                    ),
                    (
                        0,
                        Op::Poll {
                            c: 0,
                            blocking: true,
                        },
                    ),
                ],
                finish: [1, 1, 1],
            },
        ),
        // Program seed 8044187931261641910: a bounded wait in a coroutine
        // served by a shut-down context (`block_on` of it) armed a timer
        // the context refused, and never ended. It times out at once now.
        (
            "bounded wait on a shut-down context",
            Program {
                steps: vec![
                    (
                        2,
                        Op::SmolSpawn {
                            body: vec![Op::CtxNew { c: 1, uring: false }],
                        },
                    ),
                    (2, Op::SmolTick { n: 1 }),
                    (2, Op::CtxShutdown { c: 1 }),
                    (
                        2,
                        Op::BlockOn {
                            c: 1,
                            body: vec![Op::QueueWaitTimeout { us: 283 }],
                        },
                    ),
                ],
                finish: [1, 0, 1],
            },
        ),
        // Program seed 7270455167796295686: a task shut the context down
        // while a `block_on` of it waited in a bounded wait: the timer's
        // callback was dropped unrun and the wait never ended. Dropping the
        // callback expires the wait now.
        (
            "shutdown during a bounded wait",
            Program {
                steps: vec![
                    (0, Op::CtxNew { c: 1, uring: true }),
                    (
                        0,
                        Op::Spawn {
                            s: 1,
                            c: 1,
                            yields: 3,
                            body: vec![Op::CtxShutdown { c: 1 }],
                        },
                    ),
                    (
                        0,
                        Op::BlockOn {
                            c: 1,
                            body: vec![Op::QueueWaitTimeout { us: 253 }],
                        },
                    ),
                ],
                finish: [2, 2, 2],
            },
        ),
        // Program seed 17666636564805800179: an fd handler, run by a nested
        // poll inside a `block_on`'s CoroutineFuture, created a coroutine
        // that inherited the future as its resumer; detached, it made the
        // future wait for ever. What a loop's callback creates belongs to
        // the loop's context now.
        (
            "coroutine created by a callback of a nested poll",
            Program {
                steps: vec![
                    (
                        2,
                        Op::FdAdd {
                            s: 0,
                            c: 0,
                            body: vec![Op::CoNew {
                                s: 2,
                                body: vec![Op::Suspend],
                            }],
                        },
                    ),
                    (
                        2,
                        Op::Spawn {
                            s: 2,
                            c: 0,
                            yields: 1,
                            body: vec![Op::CoDetach { s: 2 }],
                        },
                    ),
                    (
                        2,
                        Op::BlockOn {
                            c: 0,
                            body: vec![
                                Op::Poll {
                                    c: 0,
                                    blocking: false,
                                },
                                Op::Sleep { us: 98 },
                            ],
                        },
                    ),
                ],
                finish: [0, 2, 0],
            },
        ),
    ]
}
