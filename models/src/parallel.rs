//! Work split over candle's CPU worker pool in shrinking chunks ("guided" scheduling): every
//! grab takes a share of what is left, so the first grabs are large (few atomic operations) and
//! the last ones a single item (the threads finish together). candle's `execute_chunked` hands
//! out fixed chunks of a sixteenth of the work on two threads; the engine thread waiting for the
//! worker's last chunk was ~3.5% of a 16-row decode profile.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// Whether this thread runs a chunk of [`for_each_chunk`]: a nested call runs inline (the
    /// pool takes one call at a time).
    static IN_CHUNK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on disjoint ranges that together cover `0..n`, on the pool's threads and the
/// calling one (a single item on the calling one alone). Not for code that runs inside one of
/// candle's own pool calls: the pool would wait on itself.
pub fn for_each_chunk(n: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || IN_CHUNK.get() {
        return f(0..n);
    }
    let pool = candle_core::utils::barrier_pool();
    // Each grab takes 1/(2·threads) of what is left.
    let share = 2 * (pool.n_workers() + 1);
    let cursor = AtomicUsize::new(0);
    pool.execute(|_| {
        let _inside = InChunk::enter();
        let mut start = cursor.load(Ordering::Relaxed);
        while start < n {
            let len = ((n - start) / share).max(1);
            match cursor.compare_exchange_weak(
                start,
                start + len,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    f(start..start + len);
                    start = cursor.load(Ordering::Relaxed);
                }
                Err(now) => start = now,
            }
        }
    });
}

/// Marks this thread as inside a chunk until dropped (also when `f` panics).
struct InChunk;

impl InChunk {
    fn enter() -> Self {
        IN_CHUNK.set(true);
        Self
    }
}

impl Drop for InChunk {
    fn drop(&mut self) {
        IN_CHUNK.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn chunks_cover_every_item_once_nested_calls_included() {
        for n in [0, 1, 2, 3, 17, 120, 1000] {
            let seen = Mutex::new(vec![0u32; n]);
            for_each_chunk(n, |range| {
                // A nested call runs inline on the same range.
                for_each_chunk(range.len(), |inner| {
                    let mut seen = seen.lock().unwrap();
                    for i in inner {
                        seen[range.start + i] += 1;
                    }
                });
            });
            assert!(
                seen.into_inner().unwrap().iter().all(|&c| c == 1),
                "n = {n}"
            );
        }
    }
}
