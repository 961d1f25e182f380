//! Choosing the next token of every sequence of a step at once, split over the CPU workers:
//! sampling reads a vocabulary-wide row per sequence (an argmax, or a softmax and a sort, plus
//! log-probabilities when asked), serial work that the compute workers would otherwise wait for.

use super::step::LogitsRow;
use super::Running;
use crate::sequence::{Choice, Sequence};
use std::sync::Mutex;

/// One sequence's sampling: what it reads and, once done, what it chose.
struct Sampling<'a> {
    seq: &'a mut Sequence,
    row: &'a LogitsRow,
    chosen: Option<Result<Choice, String>>,
}

/// The choice of each sequence whose logits row is ready, in order; a sequence without one gets
/// its error back.
pub(super) fn choose_all(
    ready: &mut [(Running, Result<LogitsRow, String>)],
) -> Vec<Result<Choice, String>> {
    let mut results: Vec<Option<Result<Choice, String>>> = Vec::with_capacity(ready.len());
    let mut work = Vec::with_capacity(ready.len());
    for (r, row) in ready.iter_mut() {
        match row {
            Ok(row) => {
                results.push(None);
                work.push(Mutex::new(Sampling {
                    seq: &mut r.seq,
                    row,
                    chosen: None,
                }));
            }
            Err(e) => results.push(Some(Err(std::mem::take(e)))),
        }
    }
    let choose = |item: &Mutex<Sampling<'_>>| {
        let mut item = item.lock().unwrap_or_else(|e| e.into_inner());
        let Sampling { seq, row, .. } = &mut *item;
        let chosen = row.read(|values| seq.choose(values));
        item.chosen = Some(chosen.map_err(|e| e.to_string()));
    };
    // Sampling is plain Rust: no call into candle's pool from inside a chunk (see
    // `for_each_chunk`).
    attune_models::parallel::for_each_chunk(work.len(), |range| {
        work[range].iter().for_each(choose)
    });
    let mut chosen = work.into_iter().map(|item| {
        item.into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .chosen
            .expect("every item was sampled")
    });
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| chosen.next().expect("one per ready row")))
        .collect()
}
