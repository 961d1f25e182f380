//! A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

pub struct ProgressBar {
    total: usize,
    tty: bool,
    start: Instant,
    state: Mutex<State>,
}

struct State {
    done: usize,
    label: String,
    last_decile: usize,
}

const WIDTH: usize = 30;

impl ProgressBar {
    pub fn new(total: usize) -> Self {
        Self {
            total: total.max(1),
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            state: Mutex::new(State {
                done: 0,
                label: String::new(),
                last_decile: 0,
            }),
        }
    }

    /// Names what is running now (the configuration).
    pub fn set_label(&self, label: &str) {
        self.state.lock().expect("not poisoned").label = label.to_string();
    }

    /// One more item done.
    pub fn tick(&self) {
        let mut state = self.state.lock().expect("not poisoned");
        state.done += 1;
        let done = state.done;
        let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let eta = (self.total.saturating_sub(done)) as f64 / rate.max(1e-9);
        let line = format!(
            "{done}/{} items, {rate:.1}/s, ETA {} | {}",
            self.total,
            clock(eta),
            state.label
        );
        if self.tty {
            let filled = WIDTH * done / self.total;
            eprint!(
                "\r[{}{}] {line}\x1b[K",
                "#".repeat(filled),
                ".".repeat(WIDTH - filled)
            );
            if done == self.total {
                eprintln!();
            }
        } else {
            let decile = done * 10 / self.total;
            if decile > state.last_decile {
                state.last_decile = decile;
                eprintln!("attune eval: {line}");
            }
        }
        let _ = std::io::stderr().flush();
    }
}

/// Seconds as `1h02m`, `3m05s` or `42s`.
fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}
