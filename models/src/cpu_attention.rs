//! Attention of one decode query on the CPU, straight from the KV cache buffers: scores,
//! softmax and the weighted sum of values in plain loops instead of ~10 small tensor ops per
//! layer. Hooks still see and replace scores, probabilities and head outputs as tensors (built
//! only when a hook asks), and every decode step on the CPU takes this path, hooked or not, so
//! a pass-through hook never changes a result.

/// One query position's attention inputs; K and V are whole cache buffers (kv_heads, capacity,
/// head_dim) of which the first `key_len` rows per head are meaningful.
pub(crate) struct DecodeQuery<'a> {
    /// (heads, head_dim), RoPE applied.
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Key positions per KV head, (kv_heads, n_keys); `None` = all `key_len` keys.
    pub keys: Option<&'a [u32]>,
    pub key_len: usize,
}

impl DecodeQuery<'_> {
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

    fn row<'b>(&self, buffer: &'b [f32], kv_head: usize, position: usize) -> &'b [f32] {
        let start = (kv_head * self.capacity + position) * self.head_dim;
        &buffer[start..start + self.head_dim]
    }

    /// Scaled scores q·k / √head_dim, (heads, n_keys); heads are split over the CPU workers.
    pub fn scores(&self) -> Vec<f32> {
        let n = self.n_keys();
        let mut scores = vec![0f32; self.heads * n];
        for_each_head(&mut scores, n, |h, row| {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2; the body is the portable code, compiled for AVX2.
                return unsafe { self.head_scores_avx2(h, row) };
            }
            self.head_scores(h, row)
        });
        scores
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn head_scores_avx2(&self, h: usize, row: &mut [f32]) {
        self.head_scores(h, row)
    }

    #[inline(always)]
    fn head_scores(&self, h: usize, row: &mut [f32]) {
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let q = &self.q[h * self.head_dim..(h + 1) * self.head_dim];
        let kv_head = h / (self.heads / self.kv_heads);
        let key = |j: usize| self.row(self.k, kv_head, self.key_position(kv_head, j));
        // Four keys at a time: independent accumulators keep the adders busy; each key's sum is
        // formed exactly as `dot` forms it.
        let whole = row.len() / 4 * 4;
        for j in (0..whole).step_by(4) {
            let dots = dot4(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            for (s, d) in row[j..j + 4].iter_mut().zip(dots) {
                *s = d * scale;
            }
        }
        for (j, s) in row.iter_mut().enumerate().skip(whole) {
            *s = dot(q, key(j)) * scale;
        }
    }

    /// Σ_j probs[h, j] · v_j per head, (heads, head_dim).
    pub fn weighted_values(&self, probs: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; self.heads * self.head_dim];
        for_each_head(&mut out, self.head_dim, |h, acc| {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: as in `scores`.
                return unsafe { self.head_values_avx2(h, probs, acc) };
            }
            self.head_values(h, probs, acc)
        });
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn head_values_avx2(&self, h: usize, probs: &[f32], acc: &mut [f32]) {
        self.head_values(h, probs, acc)
    }

    #[inline(always)]
    fn head_values(&self, h: usize, probs: &[f32], acc: &mut [f32]) {
        let n = self.n_keys();
        let kv_head = h / (self.heads / self.kv_heads);
        for (j, &p) in probs[h * n..(h + 1) * n].iter().enumerate() {
            let v = self.row(self.v, kv_head, self.key_position(kv_head, j));
            for (a, x) in acc.iter_mut().zip(v) {
                *a += p * x;
            }
        }
    }
}

/// Runs `f(head, that head's row of out)` for every row of `out` (rows `width` long), rows
/// split over candle's CPU worker pool.
fn for_each_head(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let heads = out.len() / width;
    let base = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(heads, |range| {
        for h in range {
            // SAFETY: each head is in exactly one chunk, so rows handed out never overlap, and
            // `out` outlives the call.
            let row =
                unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add(h * width), width) };
            f(h, row);
        }
    });
}

/// Dot product with eight independent lanes (vectorizes without reassociating floats, so the
/// result is the same on every instruction set).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot4(a, [b; 4])[0]
}

/// `q` · each of four keys, each summed in eight lanes in the same order as [`dot`].
#[inline(always)]
fn dot4(q: &[f32], keys: [&[f32]; 4]) -> [f32; 4] {
    let mut lanes = [[0f32; 8]; 4];
    let whole = q.len() / 8 * 8;
    for c in (0..whole).step_by(8) {
        let qc: &[f32; 8] = q[c..c + 8].try_into().expect("eight values");
        for (lane, key) in lanes.iter_mut().zip(&keys) {
            let kc: &[f32; 8] = key[c..c + 8].try_into().expect("eight values");
            for i in 0..8 {
                lane[i] += qc[i] * kc[i];
            }
        }
    }
    std::array::from_fn(|k| {
        let l = &lanes[k];
        let tail: f32 = (whole..q.len()).map(|i| q[i] * keys[k][i]).sum();
        ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])) + tail
    })
}

/// Row-wise softmax in place; rows are `n` long. A row of only -inf becomes NaN, as in the
/// tensor path, which never happens for a decode query (it always sees itself).
pub(crate) fn softmax_rows(values: &mut [f32], n: usize) {
    for row in values.chunks_exact_mut(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
}
