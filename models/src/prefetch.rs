//! Cache-line prefetch hints, for kernels whose next reads the hardware prefetcher finds late.

/// Asks for the cache lines of the `bytes` bytes from `start`: a hint, nothing on other
/// architectures. `start` may lie past the end of an allocation (a prefetch never faults), so
/// callers can ask for "the next block" without checking that there is one.
#[inline(always)]
pub(crate) fn prefetch(start: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch reads nothing architecturally and cannot fault, whatever the
        // address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes);
}
