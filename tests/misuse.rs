//! Misuse of the coroutine API: each case panics with a message naming the
//! call and what was wrong, and leaves the thread usable.

use coroloop::coroutine::{self, Coroutine};

mod common;
use common::panic_message;

fn still_usable() {
    let co = Coroutine::new(|| 1 + 1);
    co.enter();
    assert_eq!(co.take_result(), Some(2));
}

#[test]
fn recursive_enter_of_self_panics() {
    let co = Coroutine::new(|| {
        let me = Coroutine::current().unwrap();
        panic_message(|| me.enter())
    });
    co.enter();
    assert_eq!(
        co.take_result().unwrap(),
        "Coroutine::enter: coroutine re-entered recursively \
         (it is already on this thread's call chain)"
    );
    still_usable();
}

#[test]
fn recursive_enter_of_a_caller_panics() {
    let outer = Coroutine::new(|| {
        let me = Coroutine::current().unwrap();
        let inner = Coroutine::new(move || panic_message(|| me.enter()));
        inner.enter();
        inner.take_result().unwrap()
    });
    outer.enter();
    assert!(outer
        .take_result()
        .unwrap()
        .contains("coroutine re-entered recursively"));
}

#[test]
fn enter_of_a_finished_coroutine_panics() {
    let co = Coroutine::new(|| ());
    co.enter();
    assert_eq!(
        panic_message(|| co.enter()),
        "Coroutine::enter: the coroutine has already finished"
    );
    assert_eq!(
        panic_message(|| co.enter_if_inactive()),
        "Coroutine::enter: the coroutine has already finished"
    );
    still_usable();
}

#[test]
fn suspend_outside_a_coroutine_panics() {
    assert_eq!(
        panic_message(coroutine::suspend),
        "coroutine::suspend() called outside a coroutine"
    );
    still_usable();
}

#[test]
fn decreasing_the_pool_below_zero_panics() {
    let msg = panic_message(|| coroutine::decrease_pool_batch_size(usize::MAX));
    assert!(
        msg.starts_with(
            "coroutine::decrease_pool_batch_size(18446744073709551615): the batch size is only"
        ),
        "{msg}"
    );
}

#[test]
fn an_impossible_stack_size_is_an_error_not_a_panic() {
    let err = coroutine::Builder::new()
        .stack_size(1 << 46) // 64 TiB
        .spawn(|| ())
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot map a coroutine stack of"),
        "{err}"
    );
    still_usable();
}
