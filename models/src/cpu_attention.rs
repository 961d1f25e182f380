//! Attention of query rows on the CPU, straight from the KV cache buffers: scores, softmax and
//! the weighted sum of values in plain loops instead of ~10 small tensor ops per layer, each
//! (query row, KV head) of a whole batch handed to the CPU workers in one pass (the query heads
//! that share a KV head read its rows once). Hooks on scores
//! and probabilities rewrite the same numbers inside that pass (a decode row's
//! [`HeadRowRewrite`]) or between passes (as host rows or tensors), so a pass-through hook
//! never changes a result. Every instruction set computes the same floats.

use crate::exp::exp;
#[cfg(target_arch = "x86_64")]
use crate::exp::{has_avx2_fma, has_avx512};
use crate::prefetch::prefetch;

/// Whether the AVX2 lanes of attention can run (they also convert f16 cache values).
#[cfg(target_arch = "x86_64")]
fn has_simd() -> bool {
    has_avx2_fma() && std::is_x86_feature_detected!("f16c")
}
use crate::hooks::HeadRowRewrite;

/// A KV cache buffer's values, in the cache's storage type.
#[derive(Clone, Copy)]
pub(crate) enum KvValues<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

/// One query row's attention inputs (a decode step's row or a prompt row); K and V are whole
/// cache buffers (kv_heads, capacity, head_dim) of which the first `key_len` rows per head are
/// meaningful.
pub(crate) struct QueryRow<'a> {
    /// (heads, head_dim), RoPE applied.
    pub q: &'a [f32],
    pub k: KvValues<'a>,
    pub v: KvValues<'a>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Key positions per KV head, (kv_heads, n_keys); `None` = all `key_len` keys.
    pub keys: Option<&'a [u32]>,
    pub key_len: usize,
    /// A hook's change to each head's scores and probabilities, made inside the pass.
    pub rewrite: Option<&'a dyn HeadRowRewrite>,
}

impl QueryRow<'_> {
    /// Keys each head attends to.
    pub fn n_keys(&self) -> usize {
        match self.keys {
            Some(keys) => keys.len() / self.kv_heads,
            None => self.key_len,
        }
    }

    fn key_position(&self, kv_head: usize, j: usize) -> usize {
        match self.keys {
            Some(keys) => keys[kv_head * self.n_keys() + j] as usize,
            None => j,
        }
    }

    fn row<'b, T>(&self, buffer: &'b [T], kv_head: usize, position: usize) -> &'b [T] {
        let start = (kv_head * self.capacity + position) * self.head_dim;
        &buffer[start..start + self.head_dim]
    }

    /// Asks for the cache lines of key `j`'s row of `buffer`.
    #[inline(always)]
    fn prefetch_row(&self, buffer: KvValues<'_>, kv_head: usize, j: usize) {
        let position = self.key_position(kv_head, j);
        let (start, bytes) = match buffer {
            KvValues::F32(b) => {
                let row = self.row(b, kv_head, position);
                (row.as_ptr() as *const u8, std::mem::size_of_val(row))
            }
            KvValues::F16(b) => {
                let row = self.row(b, kv_head, position);
                (row.as_ptr() as *const u8, std::mem::size_of_val(row))
            }
        };
        prefetch(start, bytes);
    }

    #[inline(always)]
    fn head_scores<L: Lanes>(&self, h: usize, row: &mut [f32]) {
        match self.k {
            KvValues::F32(k) => self.head_scores_of::<L, f32>(k, h, row),
            KvValues::F16(k) => self.head_scores_of::<L, half::f16>(k, h, row),
        }
    }

    #[inline(always)]
    fn head_scores_of<L: Lanes, T: KvValue>(&self, k: &[T], h: usize, row: &mut [f32]) {
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let q = &self.q[h * self.head_dim..(h + 1) * self.head_dim];
        let kv_head = h / (self.heads / self.kv_heads);
        let key = |j: usize| self.row(k, kv_head, self.key_position(kv_head, j));
        // Four keys at a time: independent accumulators keep the adders busy; each key's sum is
        // formed exactly as a lone key's would be.
        let whole = row.len() / 4 * 4;
        for j in (0..whole).step_by(4) {
            let dots = L::dot4(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            for (s, d) in row[j..j + 4].iter_mut().zip(dots) {
                *s = d * scale;
            }
        }
        for (j, s) in row.iter_mut().enumerate().skip(whole) {
            *s = L::dot4(q, [key(j); 4])[0] * scale;
        }
    }

    /// `Σ_j probs[j] · v_j` for head `h`, added to `acc`.
    #[inline(always)]
    fn head_values<L: Lanes>(&self, h: usize, probs: &[f32], acc: &mut [f32]) {
        let kv_head = h / (self.heads / self.kv_heads);
        match self.v {
            KvValues::F32(v) => L::add_weighted(acc, probs, |j| {
                self.row(v, kv_head, self.key_position(kv_head, j))
            }),
            KvValues::F16(v) => L::add_weighted(acc, probs, |j| {
                self.row(v, kv_head, self.key_position(kv_head, j))
            }),
        }
    }

    /// Scores, softmax (after hiding keys more than `window` positions back) and weighted
    /// values of the heads that share KV head `kv_head`, into `out` (group × head_dim), with
    /// the row's rewrite of scores and probabilities if it has one: for each head the
    /// arithmetic of [`scores_all`], [`softmax_rows`] and [`weigh_values`], with each key and
    /// value row read and widened once for up to [`HEAD_TILE`] heads. `scores` is scratch.
    #[inline(always)]
    fn attend_group<L: Lanes>(
        &self,
        kv_head: usize,
        window: Option<usize>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let (group, n) = (self.heads / self.kv_heads, self.n_keys());
        out.fill(0.0);
        if n == 0 {
            return;
        }
        scores.clear();
        scores.resize(group * n, 0.0);
        match self.k {
            KvValues::F32(k) => self.group_scores::<L, f32>(k, kv_head, scores),
            KvValues::F16(k) => self.group_scores::<L, half::f16>(k, kv_head, scores),
        }
        for (i, row) in scores.chunks_exact_mut(n).enumerate() {
            let h = kv_head * group + i;
            if let Some(window) = window {
                let hidden = self.key_len.saturating_sub(window);
                row[..hidden].fill(f32::NEG_INFINITY);
            }
            if let Some(rewrite) = self.rewrite {
                rewrite.scores(h, row);
            }
            L::softmax(row);
            if let Some(rewrite) = self.rewrite {
                rewrite.probs(h, row);
            }
        }
        match self.v {
            KvValues::F32(v) => self.group_values::<L, f32>(v, kv_head, scores, out),
            KvValues::F16(v) => self.group_values::<L, half::f16>(v, kv_head, scores, out),
        }
    }

    /// The scaled scores of each head sharing `kv_head` (group × n_keys), in tiles of heads.
    #[inline(always)]
    fn group_scores<L: Lanes, T: KvValue>(&self, k: &[T], kv_head: usize, scores: &mut [f32]) {
        let group = self.heads / self.kv_heads;
        let mut done = 0;
        while done < group {
            let tile = HEAD_TILE.min(group - done);
            let rows = &mut scores[done * self.n_keys()..(done + tile) * self.n_keys()];
            let first = kv_head * group + done;
            // The first tile also asks for the value rows, read after every score is known.
            let values = (done == 0).then_some(self.v);
            match tile {
                3 => self.tile_scores::<L, T, 3>(k, kv_head, first, rows, values),
                2 => self.tile_scores::<L, T, 2>(k, kv_head, first, rows, values),
                _ => self.tile_scores::<L, T, 1>(k, kv_head, first, rows, values),
            }
            done += tile;
        }
    }

    /// [`Self::head_scores_of`] for the `H` heads from `first` (all of KV head `kv_head`), into
    /// `rows` (H × n_keys): each key row is read once for them all. With `values`, each key's
    /// value row is asked for as the key is scored.
    #[inline(always)]
    fn tile_scores<L: Lanes, T: KvValue, const H: usize>(
        &self,
        k: &[T],
        kv_head: usize,
        first: usize,
        rows: &mut [f32],
        values: Option<KvValues<'_>>,
    ) {
        let (n, hd) = (self.n_keys(), self.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let q: [&[f32]; H] = std::array::from_fn(|i| &self.q[(first + i) * hd..][..hd]);
        let key = |j: usize| self.row(k, kv_head, self.key_position(kv_head, j));
        let whole = n / 4 * 4;
        for j in (0..whole).step_by(4) {
            if j + 4 + PREFETCH_KEYS <= n {
                for ahead in j + PREFETCH_KEYS..j + 4 + PREFETCH_KEYS {
                    self.prefetch_row(self.k, kv_head, ahead);
                }
            }
            if let Some(values) = values {
                for j in j..j + 4 {
                    self.prefetch_row(values, kv_head, j);
                }
            }
            let dots = L::dot4_heads(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            for (i, dots) in dots.iter().enumerate() {
                for (s, d) in rows[i * n + j..i * n + j + 4].iter_mut().zip(dots) {
                    *s = d * scale;
                }
            }
        }
        for j in whole..n {
            let dots = L::dot4_heads(q, [key(j); 4]);
            for (i, dots) in dots.iter().enumerate() {
                rows[i * n + j] = dots[0] * scale;
            }
        }
    }

    /// `out` (group × head_dim) += each head's probabilities (group × n_keys) · its values, in
    /// tiles of heads: [`Self::head_values`] for each.
    #[inline(always)]
    fn group_values<L: Lanes, T: KvValue>(
        &self,
        v: &[T],
        kv_head: usize,
        probs: &[f32],
        out: &mut [f32],
    ) {
        let (group, n, hd) = (self.heads / self.kv_heads, self.n_keys(), self.head_dim);
        let row = |j: usize| self.row(v, kv_head, self.key_position(kv_head, j));
        let mut done = 0;
        while done < group {
            let tile = HEAD_TILE.min(group - done);
            let probs = &probs[done * n..(done + tile) * n];
            let acc = &mut out[done * hd..(done + tile) * hd];
            match tile {
                3 => L::add_weighted_heads::<T, 3>(
                    acc,
                    std::array::from_fn(|i| &probs[i * n..][..n]),
                    row,
                ),
                2 => L::add_weighted_heads::<T, 2>(
                    acc,
                    std::array::from_fn(|i| &probs[i * n..][..n]),
                    row,
                ),
                _ => L::add_weighted_heads::<T, 1>(acc, [probs], row),
            }
            done += tile;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn head_scores_avx2(&self, h: usize, row: &mut [f32]) {
        self.head_scores::<Avx2>(h, row)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn head_values_avx2(&self, h: usize, probs: &[f32], acc: &mut [f32]) {
        self.head_values::<Avx2>(h, probs, acc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn attend_group_avx2(
        &self,
        kv_head: usize,
        window: Option<usize>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        self.attend_group::<Avx2>(kv_head, window, scores, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn head_scores_avx512(&self, h: usize, row: &mut [f32]) {
        self.head_scores::<Avx512>(h, row)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn head_values_avx512(&self, h: usize, probs: &[f32], acc: &mut [f32]) {
        self.head_values::<Avx512>(h, probs, acc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn attend_group_avx512(
        &self,
        kv_head: usize,
        window: Option<usize>,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        self.attend_group::<Avx512>(kv_head, window, scores, out)
    }
}

/// Query heads that share a KV head processed together, at most (about what the sixteen
/// AVX2 registers hold: three heads' running sums for four keys, or for 32 value lanes). Taking
/// a KV head's heads together made a 16-row step's attention 12% faster, a single row's 18%.
const HEAD_TILE: usize = 3;

/// How many keys ahead of the ones being scored their rows are asked for. Each (row, KV head)
/// work item starts a new stream of keys, which the hardware prefetcher picks up late: asking
/// ahead cut a 16-row decode profile's attention samples by ~10%.
const PREFETCH_KEYS: usize = 16;

/// Attention of query rows (of one or several sequences, each with its own cache), every
/// (row, KV head) over the CPU workers in one pass: row i's outputs go to `out[i]` (heads ×
/// head_dim). The same arithmetic as [`scores_all`], [`softmax_rows`] and [`weigh_values`], so
/// results do not depend on the batch.
pub(crate) fn attend_all(queries: &[QueryRow<'_>], window: Option<usize>, out: &mut [f32]) {
    let Some(first) = queries.first() else {
        return;
    };
    let (heads, kv_heads, head_dim) = (first.heads, first.kv_heads, first.head_dim);
    assert!(queries
        .iter()
        .all(|q| (q.heads, q.kv_heads, q.head_dim) == (heads, kv_heads, head_dim)));
    assert_eq!(out.len(), queries.len() * heads * head_dim, "output size");
    #[cfg(target_arch = "x86_64")]
    let (simd, wide) = (has_simd(), has_avx512());
    // A KV head's query heads are consecutive, so their outputs are one slice of the row's.
    let items = queries.len() * kv_heads;
    for_each_head(out, head_dim * heads / kv_heads, |item, acc| {
        let (query, kv_head) = (&queries[item / kv_heads], item % kv_heads);
        // The next item's first keys, which its own look-ahead does not cover, arrive while
        // this one is computed (usually the same worker takes it next).
        if item + 1 < items {
            let (next, next_head) = (&queries[(item + 1) / kv_heads], (item + 1) % kv_heads);
            for j in 0..next.n_keys().min(PREFETCH_KEYS) {
                next.prefetch_row(next.k, next_head, j);
            }
        }
        SCRATCH.with_borrow_mut(|scores| {
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the CPU has AVX-512 F, AVX2, FMA and F16C.
                return unsafe { query.attend_group_avx512(kv_head, window, scores, acc) };
            }
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2, FMA and F16C.
                return unsafe { query.attend_group_avx2(kv_head, window, scores, acc) };
            }
            query.attend_group::<Portable>(kv_head, window, scores, acc)
        })
    });
}

/// Scaled scores of every query row as (heads, q_len, total), -inf past the keys a row sees
/// and for keys more than `window` positions back; with `softmax`, each row's probabilities
/// instead. Every (head, row) in one pass over the CPU workers.
pub(crate) fn scores_all(
    queries: &[QueryRow<'_>],
    window: Option<usize>,
    total: usize,
    softmax: bool,
) -> Vec<f32> {
    let mut scores =
        vec![f32::NEG_INFINITY; queries.len() * queries.first().map_or(0, |q| q.heads) * total];
    if total == 0 {
        return scores;
    }
    let q_len = queries.len();
    for_each_head(&mut scores, total, |item, row| {
        let (h, query) = (item / q_len, &queries[item % q_len]);
        score_keys(query, h, &mut row[..query.n_keys()]);
        if let Some(window) = window {
            let hidden = query.key_len.saturating_sub(window);
            row[..hidden].fill(f32::NEG_INFINITY);
        }
        if softmax {
            softmax_rows(row, total);
        }
    });
    scores
}

/// For rows whose scores hooks have rewritten: softmax of each (query row i, head h) row of
/// `scores` (heads, q_len, total), then that row's weighted values over the keys query i sees,
/// into `out` (q_len, heads, head_dim); every (row, head) in one pass over the CPU workers. The
/// arithmetic of [`softmax_rows`] and [`weigh_values`].
pub(crate) fn softmax_and_values(
    queries: &[QueryRow<'_>],
    scores: &[f32],
    total: usize,
    out: &mut [f32],
) {
    per_row_and_head(queries, out, |query, i, h, acc| {
        SCRATCH.with_borrow_mut(|row| {
            let at = (h * queries.len() + i) * total;
            row.clear();
            row.extend_from_slice(&scores[at..at + total]);
            softmax_rows(row, total);
            weigh_values(query, h, &row[..query.n_keys()], acc);
        })
    });
}

/// For rows whose probabilities hooks have rewritten: each (query row i, head h)'s weighted
/// values from `probs` (heads, q_len, total), into `out` (q_len, heads, head_dim).
pub(crate) fn values_of(queries: &[QueryRow<'_>], probs: &[f32], total: usize, out: &mut [f32]) {
    per_row_and_head(queries, out, |query, i, h, acc| {
        let at = (h * queries.len() + i) * total;
        weigh_values(query, h, &probs[at..at + query.n_keys()], acc);
    });
}

/// [`softmax_rows`] with the rows split over the CPU workers.
pub(crate) fn softmax_rows_parallel(values: &mut [f32], n: usize) {
    if n > 0 {
        for_each_head(values, n, |_, row| softmax_rows(row, n));
    }
}

/// `f(query, row index, head, that (row, head)'s part of out)` for every query row and head,
/// over the CPU workers; `out` is (q_len, heads, head_dim).
fn per_row_and_head(
    queries: &[QueryRow<'_>],
    out: &mut [f32],
    f: impl Fn(&QueryRow<'_>, usize, usize, &mut [f32]) + Sync,
) {
    let Some(first) = queries.first() else {
        return;
    };
    let (heads, head_dim) = (first.heads, first.head_dim);
    assert!(queries
        .iter()
        .all(|q| q.heads == heads && q.head_dim == head_dim));
    assert_eq!(out.len(), queries.len() * heads * head_dim, "output size");
    for_each_head(out, head_dim, |item, acc| {
        let (i, h) = (item / heads, item % heads);
        f(&queries[i], i, h, acc)
    });
}

thread_local! {
    /// One (row, head)'s scores, reused across a worker's items.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Scaled scores q·k / √head_dim of head `h` of `query` for each key it sees, into `row`.
fn score_keys(query: &QueryRow<'_>, h: usize, row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512 F, AVX2, FMA and F16C.
        return unsafe { query.head_scores_avx512(h, row) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_simd() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { query.head_scores_avx2(h, row) };
    }
    query.head_scores::<Portable>(h, row)
}

/// `acc = Σ_j probs[j] · v_j` for head `h` of `query`.
fn weigh_values(query: &QueryRow<'_>, h: usize, probs: &[f32], acc: &mut [f32]) {
    acc.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512 F, AVX2, FMA and F16C.
        return unsafe { query.head_values_avx512(h, probs, acc) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_simd() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { query.head_values_avx2(h, probs, acc) };
    }
    query.head_values::<Portable>(h, probs, acc)
}

/// Runs `f(head, that head's row of out)` for every row of `out` (rows `width` long), rows
/// split over candle's CPU worker pool.
fn for_each_head(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let heads = out.len() / width;
    let base = out.as_mut_ptr() as usize;
    crate::parallel::for_each_chunk(heads, |range| {
        for h in range {
            // SAFETY: each head is in exactly one chunk, so rows handed out never overlap, and
            // `out` outlives the call.
            let row =
                unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add(h * width), width) };
            f(h, row);
        }
    });
}

/// A value type of the KV cache: f32, or f16 (converted exactly to f32 before any arithmetic).
pub(crate) trait KvValue: Copy + Sync + 'static {
    fn to_f32(self) -> f32;

    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; eight values are readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Eight values from `low` in lanes 0..8 and eight from `high` in lanes 8..16, as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and F16C; eight values are readable at each pointer.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8x2(low: *const Self, high: *const Self) -> std::arch::x86_64::__m512;

    /// Sixteen values from `p` as f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; sixteen values are readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvValue for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's promise.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8x2(low: *const Self, high: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise. (As f64 lanes: inserting eight f32 lanes needs DQ.)
        unsafe {
            let low = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(low)));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                low,
                _mm256_castps_pd(_mm256_loadu_ps(high)),
            ))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's promise.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvValue for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8x2(low: *const Self, high: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise.
        unsafe {
            let low = _mm256_castsi128_si256(_mm_loadu_si128(low as *const __m128i));
            _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
                low,
                _mm_loadu_si128(high as *const __m128i),
            ))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's promise.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// Attention's per-key arithmetic, by instruction set; every implementation gives the same
/// floats, so a result does not depend on the CPU or on which path computed it.
trait Lanes {
    /// `q` · each of four keys: per key, eight lanes of running sums of `q[i]·k[i]` (fused
    /// multiply-adds), combined as ((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7)), plus the products past the
    /// last whole eight.
    fn dot4<T: KvValue>(q: &[f32], keys: [&[T]; 4]) -> [f32; 4];

    /// [`Self::dot4`] of each of `H` query heads with the same four keys, each key read once:
    /// `dot4_heads(q, keys)[h] == dot4(q[h], keys)`.
    fn dot4_heads<T: KvValue, const H: usize>(q: [&[f32]; H], keys: [&[T]; 4]) -> [[f32; 4]; H];

    /// `acc[i] += probs[j] · row(j)[i]` for j in order (fused multiply-adds).
    fn add_weighted<'r, T: KvValue>(acc: &mut [f32], probs: &[f32], row: impl Fn(usize) -> &'r [T]);

    /// [`Self::add_weighted`] of `H` heads over the same rows, each row read once: head h's
    /// sums are `acc[h·d..(h+1)·d]` (d = acc.len() / H) and its weights `probs[h]`.
    fn add_weighted_heads<'r, T: KvValue, const H: usize>(
        acc: &mut [f32],
        probs: [&[f32]; H],
        row: impl Fn(usize) -> &'r [T],
    );

    /// Softmax of `row` in place: [`crate::exp::exp`] of each value less the row's maximum,
    /// summed in eight lanes (value j in lane j mod 8) combined as in [`Self::dot4`], then each
    /// value divided by that sum. Trailing -inf scores (keys a row does not see) add zeros to
    /// the lanes, so a row padded with them gets the same probabilities as the row alone.
    fn softmax(row: &mut [f32]);
}

/// Plain Rust, for any CPU.
struct Portable;

impl Lanes for Portable {
    #[inline(always)]
    fn dot4<T: KvValue>(q: &[f32], keys: [&[T]; 4]) -> [f32; 4] {
        let mut lanes = [[0f32; 8]; 4];
        let whole = q.len() / 8 * 8;
        for c in (0..whole).step_by(8) {
            let qc: &[f32; 8] = q[c..c + 8].try_into().expect("eight values");
            for (lane, key) in lanes.iter_mut().zip(&keys) {
                let kc: &[T; 8] = key[c..c + 8].try_into().expect("eight values");
                for i in 0..8 {
                    lane[i] = qc[i].mul_add(kc[i].to_f32(), lane[i]);
                }
            }
        }
        std::array::from_fn(|k| {
            let l = &lanes[k];
            let tail = (whole..q.len()).fold(0f32, |t, i| q[i].mul_add(keys[k][i].to_f32(), t));
            sum_lanes(*l) + tail
        })
    }

    #[inline(always)]
    fn dot4_heads<T: KvValue, const H: usize>(q: [&[f32]; H], keys: [&[T]; 4]) -> [[f32; 4]; H] {
        q.map(|q| Self::dot4(q, keys))
    }

    #[inline(always)]
    fn add_weighted<'r, T: KvValue>(
        acc: &mut [f32],
        probs: &[f32],
        row: impl Fn(usize) -> &'r [T],
    ) {
        for (j, &p) in probs.iter().enumerate() {
            for (a, x) in acc.iter_mut().zip(row(j)) {
                *a = p.mul_add(x.to_f32(), *a);
            }
        }
    }

    #[inline(always)]
    fn add_weighted_heads<'r, T: KvValue, const H: usize>(
        acc: &mut [f32],
        probs: [&[f32]; H],
        row: impl Fn(usize) -> &'r [T],
    ) {
        let d = acc.len() / H;
        for (acc, probs) in acc.chunks_exact_mut(d).zip(probs) {
            Self::add_weighted(acc, probs, &row);
        }
    }

    #[inline(always)]
    fn softmax(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut lanes = [0f32; 8];
        for (j, x) in row.iter_mut().enumerate() {
            *x = exp(*x - max);
            lanes[j % 8] += *x;
        }
        let sum = sum_lanes(lanes);
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
}

/// AVX2 registers; only reached from `#[target_feature(enable = "avx2,fma")]` functions called
/// after detecting AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx2 {
    #[inline(always)]
    fn dot4<T: KvValue>(q: &[f32], keys: [&[T]; 4]) -> [f32; 4] {
        use std::arch::x86_64::*;
        assert!(keys.iter().all(|k| k.len() == q.len()));
        let whole = q.len() / 8 * 8;
        // SAFETY: AVX2 and FMA are present (see the type's comment); loads stay below `whole`.
        unsafe {
            let mut lanes = [_mm256_setzero_ps(); 4];
            for c in (0..whole).step_by(8) {
                let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                for (lane, key) in lanes.iter_mut().zip(&keys) {
                    *lane = _mm256_fmadd_ps(qc, T::load8(key.as_ptr().add(c)), *lane);
                }
            }
            // Plain loops, not closures: a closure's body would not get AVX2 inlined into it.
            let mut dots = [0f32; 4];
            for (k, (dot, l)) in dots.iter_mut().zip(lanes).enumerate() {
                let mut tail = 0f32;
                for i in whole..q.len() {
                    tail = q[i].mul_add(keys[k][i].to_f32(), tail);
                }
                *dot = sum_lanes_avx2(l) + tail;
            }
            dots
        }
    }

    #[inline(always)]
    fn dot4_heads<T: KvValue, const H: usize>(q: [&[f32]; H], keys: [&[T]; 4]) -> [[f32; 4]; H] {
        use std::arch::x86_64::*;
        let len = keys[0].len();
        assert!(keys.iter().all(|k| k.len() == len) && q.iter().all(|q| q.len() == len));
        let whole = len / 8 * 8;
        // SAFETY: AVX2 and FMA are present (see the type's comment); loads stay below `whole`.
        unsafe {
            let mut lanes = [[_mm256_setzero_ps(); 4]; H];
            for c in (0..whole).step_by(8) {
                let k: [__m256; 4] = std::array::from_fn(|k| T::load8(keys[k].as_ptr().add(c)));
                for (lanes, q) in lanes.iter_mut().zip(&q) {
                    let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                    for (lane, k) in lanes.iter_mut().zip(k) {
                        *lane = _mm256_fmadd_ps(qc, k, *lane);
                    }
                }
            }
            // As in `dot4`: plain loops, so that AVX2 is inlined into them.
            let mut dots = [[0f32; 4]; H];
            for ((dots, lanes), q) in dots.iter_mut().zip(&lanes).zip(&q) {
                for (k, (dot, l)) in dots.iter_mut().zip(lanes).enumerate() {
                    let mut tail = 0f32;
                    for i in whole..len {
                        tail = q[i].mul_add(keys[k][i].to_f32(), tail);
                    }
                    *dot = sum_lanes_avx2(*l) + tail;
                }
            }
            dots
        }
    }

    #[inline(always)]
    fn add_weighted_heads<'r, T: KvValue, const H: usize>(
        acc: &mut [f32],
        probs: [&[f32]; H],
        row: impl Fn(usize) -> &'r [T],
    ) {
        use std::arch::x86_64::*;
        // 32 outputs of each head at a time: H × 4 running sums and a row's four lanes.
        const WIDTH: usize = 32;
        let d = acc.len() / H;
        if !d.is_multiple_of(WIDTH) {
            return Portable::add_weighted_heads(acc, probs, row);
        }
        let keys = probs[0].len();
        assert!(probs.iter().all(|p| p.len() == keys));
        for c in (0..d).step_by(WIDTH) {
            // SAFETY: AVX2 and FMA are present; every row is `d` long (asserted) and each head's
            // sums lie within `acc`, so every 32-value read and write is in bounds.
            unsafe {
                let mut sums = [[_mm256_setzero_ps(); 4]; H];
                for (h, sums) in sums.iter_mut().enumerate() {
                    for (r, sum) in sums.iter_mut().enumerate() {
                        *sum = _mm256_loadu_ps(acc.as_ptr().add(h * d + c + 8 * r));
                    }
                }
                for j in 0..keys {
                    let values = row(j);
                    assert_eq!(values.len(), d);
                    let v: [__m256; 4] =
                        std::array::from_fn(|r| T::load8(values.as_ptr().add(c + 8 * r)));
                    for (sums, probs) in sums.iter_mut().zip(&probs) {
                        let p = _mm256_set1_ps(*probs.get_unchecked(j));
                        for (sum, v) in sums.iter_mut().zip(v) {
                            *sum = _mm256_fmadd_ps(p, v, *sum);
                        }
                    }
                }
                for (h, sums) in sums.iter().enumerate() {
                    for (r, sum) in sums.iter().enumerate() {
                        _mm256_storeu_ps(acc.as_mut_ptr().add(h * d + c + 8 * r), *sum);
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn add_weighted<'r, T: KvValue>(
        acc: &mut [f32],
        probs: &[f32],
        row: impl Fn(usize) -> &'r [T],
    ) {
        use std::arch::x86_64::*;
        const WIDTH: usize = 64;
        if !acc.len().is_multiple_of(WIDTH) {
            return Portable::add_weighted(acc, probs, row);
        }
        let len = acc.len();
        // 64 outputs at a time stay in eight registers over all keys.
        for (c, out) in acc.chunks_exact_mut(WIDTH).enumerate() {
            // SAFETY: AVX2 and FMA are present; every row is as long as `acc` (asserted), so each
            // 64-value chunk read is in bounds.
            unsafe {
                let mut sums = [_mm256_setzero_ps(); 8];
                for (r, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm256_loadu_ps(out.as_ptr().add(8 * r));
                }
                for (j, &p) in probs.iter().enumerate() {
                    let values = row(j);
                    assert_eq!(values.len(), len);
                    let p = _mm256_set1_ps(p);
                    for (r, sum) in sums.iter_mut().enumerate() {
                        let v = T::load8(values.as_ptr().add(c * WIDTH + 8 * r));
                        *sum = _mm256_fmadd_ps(p, v, *sum);
                    }
                }
                for (r, sum) in sums.iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add(8 * r), *sum);
                }
            }
        }
    }

    #[inline(always)]
    fn softmax(row: &mut [f32]) {
        use std::arch::x86_64::*;
        let whole = row.len() / 8 * 8;
        let at = row.as_mut_ptr();
        // SAFETY: AVX2 and FMA are present (see the type's comment); every load and store is
        // of eight values below `whole`.
        unsafe {
            let mut maxima = _mm256_set1_ps(f32::NEG_INFINITY);
            for c in (0..whole).step_by(8) {
                // A NaN value is skipped, as `f32::max` skips it.
                maxima = _mm256_max_ps(_mm256_loadu_ps(at.add(c)), maxima);
            }
            let mut maxima_lanes = [0f32; 8];
            _mm256_storeu_ps(maxima_lanes.as_mut_ptr(), maxima);
            let max = row[whole..]
                .iter()
                .chain(&maxima_lanes)
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let offset = _mm256_set1_ps(max);
            let mut sums = _mm256_setzero_ps();
            for c in (0..whole).step_by(8) {
                let e = crate::exp::avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(at.add(c)), offset));
                _mm256_storeu_ps(at.add(c), e);
                sums = _mm256_add_ps(sums, e);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
            for (lane, x) in lanes.iter_mut().zip(&mut row[whole..]) {
                *x = exp(*x - max);
                *lane += *x;
            }
            let sum = sum_lanes(lanes);
            let divisor = _mm256_set1_ps(sum);
            for c in (0..whole).step_by(8) {
                _mm256_storeu_ps(
                    at.add(c),
                    _mm256_div_ps(_mm256_loadu_ps(at.add(c)), divisor),
                );
            }
            for x in &mut row[whole..] {
                *x /= sum;
            }
        }
    }
}

/// AVX-512 registers with the AVX2 lanes' arithmetic: a dot product keeps each key's eight
/// running sums (two keys side by side in a register), values and softmax take sixteen lanes at
/// a time with each lane's operations unchanged, so the floats are the other implementations'.
/// Only reached from `#[target_feature(enable = "avx2,fma,f16c,avx512f")]` functions called
/// after detecting those features.
#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx512 {
    #[inline(always)]
    fn dot4<T: KvValue>(q: &[f32], keys: [&[T]; 4]) -> [f32; 4] {
        let [dots] = Self::dot4_heads::<T, 1>([q], keys);
        dots
    }

    #[inline(always)]
    fn dot4_heads<T: KvValue, const H: usize>(q: [&[f32]; H], keys: [&[T]; 4]) -> [[f32; 4]; H] {
        use std::arch::x86_64::*;
        let len = keys[0].len();
        assert!(keys.iter().all(|k| k.len() == len) && q.iter().all(|q| q.len() == len));
        let whole = len / 8 * 8;
        // SAFETY: AVX-512 F, AVX2, FMA and F16C are present (see the type's comment); loads stay
        // below `whole`.
        unsafe {
            // Per head: keys 0 and 1 side by side, then keys 2 and 3.
            let mut pairs = [[_mm512_setzero_ps(); 2]; H];
            for c in (0..whole).step_by(8) {
                let k01 = T::load8x2(keys[0].as_ptr().add(c), keys[1].as_ptr().add(c));
                let k23 = T::load8x2(keys[2].as_ptr().add(c), keys[3].as_ptr().add(c));
                for (pairs, q) in pairs.iter_mut().zip(&q) {
                    // The head's eight values in both halves.
                    let qc = _mm256_castps_pd(_mm256_loadu_ps(q.as_ptr().add(c)));
                    let qc = _mm512_castpd_ps(_mm512_broadcast_f64x4(qc));
                    pairs[0] = _mm512_fmadd_ps(qc, k01, pairs[0]);
                    pairs[1] = _mm512_fmadd_ps(qc, k23, pairs[1]);
                }
            }
            // As in `Avx2::dot4`: plain loops, so that the intrinsics are inlined into them.
            let mut dots = [[0f32; 4]; H];
            for ((dots, pairs), q) in dots.iter_mut().zip(&pairs).zip(&q) {
                let sums = sum_lanes_of_four(pairs[0], pairs[1]);
                for (k, (dot, sum)) in dots.iter_mut().zip(sums).enumerate() {
                    let mut tail = 0f32;
                    for i in whole..len {
                        tail = q[i].mul_add(keys[k][i].to_f32(), tail);
                    }
                    *dot = sum + tail;
                }
            }
            dots
        }
    }

    #[inline(always)]
    fn add_weighted<'r, T: KvValue>(
        acc: &mut [f32],
        probs: &[f32],
        row: impl Fn(usize) -> &'r [T],
    ) {
        Self::add_weighted_heads::<T, 1>(acc, [probs], row)
    }

    #[inline(always)]
    fn add_weighted_heads<'r, T: KvValue, const H: usize>(
        acc: &mut [f32],
        probs: [&[f32]; H],
        row: impl Fn(usize) -> &'r [T],
    ) {
        use std::arch::x86_64::*;
        // 64 outputs of each head at a time: H × 4 running sums and a row's four registers.
        const WIDTH: usize = 64;
        let d = acc.len() / H;
        if !d.is_multiple_of(WIDTH) {
            return Avx2::add_weighted_heads(acc, probs, row);
        }
        let keys = probs[0].len();
        assert!(probs.iter().all(|p| p.len() == keys));
        for c in (0..d).step_by(WIDTH) {
            // SAFETY: AVX-512 F, FMA and F16C are present; every row is `d` long (asserted) and
            // each head's sums lie within `acc`, so every 64-value read and write is in bounds.
            unsafe {
                let mut sums = [[_mm512_setzero_ps(); 4]; H];
                for (h, sums) in sums.iter_mut().enumerate() {
                    for (r, sum) in sums.iter_mut().enumerate() {
                        *sum = _mm512_loadu_ps(acc.as_ptr().add(h * d + c + 16 * r));
                    }
                }
                for j in 0..keys {
                    let values = row(j);
                    assert_eq!(values.len(), d);
                    let v: [__m512; 4] =
                        std::array::from_fn(|r| T::load16(values.as_ptr().add(c + 16 * r)));
                    for (sums, probs) in sums.iter_mut().zip(&probs) {
                        let p = _mm512_set1_ps(*probs.get_unchecked(j));
                        for (sum, v) in sums.iter_mut().zip(v) {
                            *sum = _mm512_fmadd_ps(p, v, *sum);
                        }
                    }
                }
                for (h, sums) in sums.iter().enumerate() {
                    for (r, sum) in sums.iter().enumerate() {
                        _mm512_storeu_ps(acc.as_mut_ptr().add(h * d + c + 16 * r), *sum);
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn softmax(row: &mut [f32]) {
        use std::arch::x86_64::*;
        let whole = row.len() / 16 * 16;
        let at = row.as_mut_ptr();
        // SAFETY: AVX-512 F and AVX2 are present (see the type's comment); every load and store
        // is of sixteen values below `whole`.
        unsafe {
            let mut maxima = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in (0..whole).step_by(16) {
                // A NaN value is skipped, as `f32::max` skips it.
                maxima = _mm512_max_ps(_mm512_loadu_ps(at.add(c)), maxima);
            }
            let mut maxima_lanes = [0f32; 16];
            _mm512_storeu_ps(maxima_lanes.as_mut_ptr(), maxima);
            let max = row[whole..]
                .iter()
                .chain(&maxima_lanes)
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let offset = _mm512_set1_ps(max);
            // Value j goes to lane j mod 8 in order: a register's low eight, then its high eight.
            let mut sums = _mm256_setzero_ps();
            for c in (0..whole).step_by(16) {
                let e = crate::exp::avx512::exp(_mm512_sub_ps(_mm512_loadu_ps(at.add(c)), offset));
                _mm512_storeu_ps(at.add(c), e);
                let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
                sums = _mm256_add_ps(_mm256_add_ps(sums, _mm512_castps512_ps256(e)), high);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
            for (j, x) in row[whole..].iter_mut().enumerate() {
                *x = exp(*x - max);
                lanes[j % 8] += *x;
            }
            let sum = sum_lanes(lanes);
            let divisor = _mm512_set1_ps(sum);
            for c in (0..whole).step_by(16) {
                _mm512_storeu_ps(
                    at.add(c),
                    _mm512_div_ps(_mm512_loadu_ps(at.add(c)), divisor),
                );
            }
            for x in &mut row[whole..] {
                *x /= sum;
            }
        }
    }
}

/// [`sum_lanes`] of four keys' eight running sums, held two keys to a register (`k01`: key 0
/// in lanes 0..8, key 1 in 8..16; `k23` likewise), with the same additions in the same order.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sum_lanes_of_four(
    k01: std::arch::x86_64::__m512,
    k23: std::arch::x86_64::__m512,
) -> [f32; 4] {
    use std::arch::x86_64::*;
    // SAFETY: AVX-512 F is present (the caller's promise).
    unsafe {
        // Each four-lane quarter plus its neighbour: (l0+l4, l1+l5, l2+l6, l3+l7) per key, twice.
        let s01 = _mm512_add_ps(k01, _mm512_shuffle_f32x4::<0b10_11_00_01>(k01, k01));
        let s23 = _mm512_add_ps(k23, _mm512_shuffle_f32x4::<0b10_11_00_01>(k23, k23));
        // Quarters: key 0, key 2, key 1, key 3.
        let s = _mm512_mask_blend_ps(0xF0F0, s01, s23);
        let t = _mm512_add_ps(s, _mm512_permute_ps::<0b10_11_00_01>(s));
        let u = _mm512_add_ps(t, _mm512_permute_ps::<0b01_00_11_10>(t));
        let order = _mm512_setr_epi32(0, 8, 4, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut dots = [0f32; 4];
        _mm_storeu_ps(
            dots.as_mut_ptr(),
            _mm512_castps512_ps128(_mm512_permutexvar_ps(order, u)),
        );
        dots
    }
}

/// [`sum_lanes`] of a register: [l0+l4, l1+l5, l2+l6, l3+l7], then [s0+s1, _, s2+s3, _].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sum_lanes_avx2(l: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(l), _mm256_extractf128_ps(l, 1));
    let t = _mm_add_ps(s, _mm_shuffle_ps(s, s, 0b10_11_00_01));
    _mm_cvtss_f32(t) + _mm_cvtss_f32(_mm_movehl_ps(t, t))
}

/// Row-wise softmax in place; rows are `n` long. A row of only -inf becomes NaN, as in the
/// tensor path, which never happens for a decode query (it always sees itself).
fn softmax_rows(values: &mut [f32], n: usize) {
    for row in values.chunks_exact_mut(n) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has AVX-512 F, AVX2 and FMA.
            unsafe { softmax_avx512(row) };
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { softmax_avx2(row) };
            continue;
        }
        Portable::softmax(row)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(row: &mut [f32]) {
    Avx2::softmax(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
fn softmax_avx512(row: &mut [f32]) {
    Avx512::softmax(row)
}

/// The lane-order sum ((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7)) of eight running sums.
fn sum_lanes(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::testing::SeededRng;

    #[test]
    fn simd_lanes_give_the_portable_floats() {
        if has_simd() {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            unsafe { avx2_lanes_match() };
        }
        if has_avx512() {
            // SAFETY: the CPU has AVX-512 F, AVX2, FMA and F16C.
            unsafe { avx512_lanes_match() };
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_lanes_match() {
        lanes_match_portable::<Avx2>("avx2")
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn avx512_lanes_match() {
        lanes_match_portable::<Avx512>("avx512")
    }

    /// Every function of lanes `L` gives exactly the portable floats: dot products of one head
    /// and of three sharing keys, weighted values of one head and of three, for f32 and f16
    /// rows of several widths, and softmax of rows of several lengths (also padded with unseen
    /// keys).
    #[inline(always)]
    fn lanes_match_portable<L: Lanes>(name: &str) {
        let mut rng = SeededRng::new(3);
        let mut values = |n: usize| (0..n).map(|_| rng.next_f32() - 0.5).collect::<Vec<f32>>();
        let half = |v: &[f32]| {
            v.iter()
                .map(|&x| half::f16::from_f32(x))
                .collect::<Vec<_>>()
        };
        let widened = |v: &[half::f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        for dim in [64, 128, 72, 40, 5] {
            let q: Vec<Vec<f32>> = (0..3).map(|_| values(dim)).collect();
            let keys: Vec<Vec<f32>> = (0..4).map(|_| values(dim)).collect();
            let keys32 = [&keys[0][..], &keys[1][..], &keys[2][..], &keys[3][..]];
            // An f16 cache: the same floats as its values converted to f32 first.
            let keys16: Vec<Vec<half::f16>> = keys.iter().map(|k| half(k)).collect();
            let keys16 = [
                &keys16[0][..],
                &keys16[1][..],
                &keys16[2][..],
                &keys16[3][..],
            ];
            let widened_keys: Vec<Vec<f32>> = keys16.iter().map(|k| widened(k)).collect();
            let widened_keys = [
                &widened_keys[0][..],
                &widened_keys[1][..],
                &widened_keys[2][..],
                &widened_keys[3][..],
            ];
            let heads = [&q[0][..], &q[1][..], &q[2][..]];
            let portable32 = heads.map(|q| Portable::dot4(q, keys32));
            let portable16 = heads.map(|q| Portable::dot4(q, widened_keys));
            assert_eq!(L::dot4(heads[0], keys32), portable32[0], "{name} dim {dim}");
            assert_eq!(L::dot4_heads(heads, keys32), portable32, "{name} dim {dim}");
            assert_eq!(
                L::dot4(heads[0], keys16),
                portable16[0],
                "{name} f16 dim {dim}"
            );
            assert_eq!(
                L::dot4_heads(heads, keys16),
                portable16,
                "{name} f16 dim {dim}"
            );

            let probs: Vec<Vec<f32>> = (0..3).map(|_| values(7)).collect();
            let probs = [&probs[0][..], &probs[1][..], &probs[2][..]];
            let rows: Vec<Vec<f32>> = (0..7).map(|_| values(dim)).collect();
            let rows16: Vec<Vec<half::f16>> = rows.iter().map(|r| half(r)).collect();
            let widened_rows: Vec<Vec<f32>> = rows16.iter().map(|r| widened(r)).collect();
            let start = values(3 * dim);
            let mut portable = start.clone();
            for (acc, probs) in portable.chunks_exact_mut(dim).zip(probs) {
                Portable::add_weighted(acc, probs, |j| &rows[j]);
            }
            let mut simd = start.clone();
            L::add_weighted(&mut simd[..dim], probs[0], |j| &rows[j]);
            assert_eq!(simd[..dim], portable[..dim], "{name} dim {dim}");
            let mut simd = start.clone();
            L::add_weighted_heads(&mut simd, probs, |j| &rows[j]);
            assert_eq!(simd, portable, "{name} dim {dim}");
            let mut portable = vec![0f32; 3 * dim];
            for (acc, probs) in portable.chunks_exact_mut(dim).zip(probs) {
                Portable::add_weighted(acc, probs, |j| &widened_rows[j]);
            }
            let mut simd = vec![0f32; 3 * dim];
            L::add_weighted_heads(&mut simd, probs, |j| &rows16[j]);
            assert_eq!(simd, portable, "{name} f16 dim {dim}");
        }
        for len in [1, 7, 8, 13, 16, 29, 64, 231] {
            let mut portable: Vec<f32> = values(len).iter().map(|x| 30.0 * x).collect();
            if len > 1 {
                portable[len / 2] = f32::NEG_INFINITY;
            }
            let mut simd = portable.clone();
            let mut padded = [&portable[..], &[f32::NEG_INFINITY; 11]].concat();
            Portable::softmax(&mut portable);
            L::softmax(&mut simd);
            assert_eq!(simd, portable, "{name} softmax of {len}");
            L::softmax(&mut padded);
            assert_eq!(
                padded[..len],
                portable,
                "{name} softmax of {len} padded with unseen keys"
            );
        }
    }

    /// The one-pass kernel takes a KV head's query heads together (tiles of up to three heads
    /// sharing each key and value row); every head must get exactly what the per-head
    /// functions give it, for f32 and f16 caches, chosen keys and a window.
    #[test]
    fn heads_sharing_a_kv_head_get_the_per_head_floats() {
        let mut rng = SeededRng::new(11);
        let mut values = |n: usize| (0..n).map(|_| rng.next_f32() - 0.5).collect::<Vec<f32>>();
        for (heads, kv_heads, head_dim) in
            [(9, 3, 64), (8, 2, 64), (5, 1, 32), (4, 4, 40), (6, 3, 8)]
        {
            let (capacity, key_len) = (24, 19);
            let q = values(heads * head_dim);
            let k32 = values(kv_heads * capacity * head_dim);
            let v32 = values(kv_heads * capacity * head_dim);
            let k16: Vec<half::f16> = k32.iter().map(|&x| half::f16::from_f32(x)).collect();
            let v16: Vec<half::f16> = v32.iter().map(|&x| half::f16::from_f32(x)).collect();
            let chosen: Vec<u32> = (0..kv_heads as u32)
                .flat_map(|g| [0, 3 + g, 7, 11, 18])
                .collect();
            for (cache, keys, window) in [
                ((KvValues::F32(&k32), KvValues::F32(&v32)), None, None),
                ((KvValues::F16(&k16), KvValues::F16(&v16)), None, Some(6)),
                (
                    (KvValues::F16(&k16), KvValues::F16(&v16)),
                    Some(&chosen[..]),
                    None,
                ),
            ] {
                let query = QueryRow {
                    q: &q,
                    k: cache.0,
                    v: cache.1,
                    heads,
                    kv_heads,
                    head_dim,
                    capacity,
                    keys,
                    key_len,
                    rewrite: None,
                };
                let mut together = vec![0f32; heads * head_dim];
                attend_all(std::slice::from_ref(&query), window, &mut together);
                for h in 0..heads {
                    let mut row = vec![0f32; query.n_keys()];
                    score_keys(&query, h, &mut row);
                    if let Some(window) = window {
                        row[..key_len - window].fill(f32::NEG_INFINITY);
                    }
                    softmax_rows(&mut row, query.n_keys());
                    let mut alone = vec![0f32; head_dim];
                    weigh_values(&query, h, &row, &mut alone);
                    assert_eq!(
                        together[h * head_dim..(h + 1) * head_dim],
                        alone,
                        "{heads}/{kv_heads} heads of {head_dim}, head {h}, keys {keys:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_matches_libm_within_rounding() {
        let mut rng = SeededRng::new(5);
        let mut row: Vec<f32> = (0..100).map(|_| 20.0 * (rng.next_f32() - 0.5)).collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|x| ((x - max) as f64).exp()).sum();
        let exact: Vec<f64> = row.iter().map(|x| ((x - max) as f64).exp() / sum).collect();
        softmax_rows(&mut row, 100);
        for (p, e) in row.iter().zip(exact) {
            assert!((*p as f64 - e).abs() <= 1e-6 * e.max(1e-30), "{p} vs {e}");
        }
    }
}
