//! Pool accounting. One test function, so that nothing else in this binary
//! creates coroutines while it counts stacks.

use coroloop::coroutine::{self, Coroutine};

fn suspended() -> std::io::Result<Coroutine> {
    let co = coroutine::Builder::new().build(coroutine::suspend)?;
    co.enter();
    Ok(co)
}

#[test]
fn pool_accounting() {
    let batch = coroutine::pool_batch_size();
    assert_eq!(batch, 64, "QEMU's initial pool size");

    // Finished coroutines are reused: no new stack per coroutine.
    Coroutine::new(|| ()).enter();
    let live = coroutine::live_stacks();
    for i in 0..10_000u32 {
        let co = Coroutine::new(move || i);
        co.enter();
        assert_eq!(co.take_result(), Some(i));
    }
    assert_eq!(coroutine::live_stacks(), live);

    // Many at once: the local pool keeps `batch` workers, the release pool
    // up to twice that many bare stacks, the rest is unmapped.
    let cos: Vec<_> = (0..500).map(|_| suspended().unwrap()).collect();
    assert!(coroutine::live_stacks() >= 500);
    for co in &cos {
        co.enter();
    }
    drop(cos);
    let (local, global) = coroutine::pool_stats();
    assert_eq!(local, batch);
    assert_eq!(global, 2 * batch);
    assert_eq!(coroutine::live_stacks(), 3 * batch);

    // A larger batch keeps more; shrinking trims this thread's pool at once.
    coroutine::increase_pool_batch_size(200);
    let cos: Vec<_> = (0..500).map(|_| suspended().unwrap()).collect();
    drop(cos); // unwinds them; their workers come back
    assert_eq!(coroutine::pool_stats().0, batch + 200);
    coroutine::decrease_pool_batch_size(200);
    let (local, global) = coroutine::pool_stats();
    assert_eq!(local, batch);
    assert!(global <= 2 * batch);

    // Workers never change thread: a thread's pool is retired when it
    // exits, its stacks going to the release pool or being unmapped.
    let before = coroutine::live_stacks();
    std::thread::spawn(|| {
        let cos: Vec<_> = (0..100).map(|_| suspended().unwrap()).collect();
        for co in &cos {
            co.enter();
        }
        assert_eq!(coroutine::pool_stats().0, 64);
    })
    .join()
    .unwrap();
    assert!(coroutine::live_stacks() <= before.max(3 * batch));
    assert_eq!(coroutine::pool_stats().1, 2 * batch);

    // The stack budget counts idle stacks, and creation gives them back
    // before failing.
    let default_limit = coroutine::max_live_stacks();
    let idle = coroutine::live_stacks();
    assert_eq!(idle, 3 * batch, "only pooled stacks are mapped");
    coroutine::set_max_live_stacks(idle);
    let small = || {
        let co = coroutine::Builder::new()
            .stack_size(16 * 1024) // not poolable: needs a new mapping
            .build(coroutine::suspend)?;
        co.enter();
        Ok::<_, std::io::Error>(co)
    };
    let cos: Vec<_> = (0..idle).map(|_| small().unwrap()).collect();
    assert_eq!(coroutine::pool_stats(), (0, 0), "idle stacks were unmapped");
    assert_eq!(coroutine::live_stacks(), idle);
    let err = small().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::OutOfMemory);
    drop(cos);
    assert_eq!(coroutine::live_stacks(), 0, "small stacks are not pooled");
    drop(small().expect("room again"));
    coroutine::set_max_live_stacks(default_limit);
    assert_eq!(coroutine::max_live_stacks(), default_limit);
}
