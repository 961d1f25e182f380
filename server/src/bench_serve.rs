//! `attune bench --serve`: load on a real server over HTTP. Streams chat requests at several
//! concurrency levels and reports aggregate generated tokens/s (end to end, prefills
//! included), aggregate decode tokens/s (each stream's rate after its first token, summed over
//! the streams) and latency percentiles, each throughput also against the first level's. The
//! levels run in rounds (1, 4, 16, 1, 4, 16, ...) and each figure is the median over rounds, so
//! a slow or fast spell of the machine does not land on one level only.

use crate::bench::median;
use crate::local_server;
use anyhow::Result;
use attune_config::AttuneConfig;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub concurrency: Vec<usize>,
    /// Requests per stream at each level, per round.
    pub requests_per_stream: usize,
    pub max_tokens: usize,
    pub rounds: usize,
}

struct Sample {
    latency: Duration,
    first_token: Duration,
    tokens: usize,
}

impl Sample {
    /// Tokens per second after the first one (0 when nothing followed it).
    fn decode_rate(&self) -> f64 {
        let after_first = (self.latency - self.first_token).as_secs_f64();
        if self.tokens < 2 || after_first <= 0.0 {
            return 0.0;
        }
        (self.tokens - 1) as f64 / after_first
    }
}

/// One level's results over the rounds.
#[derive(Default)]
struct Level {
    samples: Vec<Sample>,
    aggregate: Vec<f64>,
    decode: Vec<f64>,
}

/// Runs against `url`, or against a server started in this process from `config`.
pub fn run(url: Option<String>, config: AttuneConfig, load: &LoadConfig) -> Result<()> {
    let in_process = url.is_none();
    let base = match url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => local_server::start(config)?,
    };
    local_server::wait_ready(&base, None)?;
    println!(
        "server: {base} | {} generated tokens per request (greedy, chat) | {} requests per stream | median of {} rounds",
        load.max_tokens, load.requests_per_stream, load.rounds
    );
    let mut levels: Vec<Level> = load.concurrency.iter().map(|_| Level::default()).collect();
    for round in 0..load.rounds {
        for (&streams, level) in load.concurrency.iter().zip(&mut levels) {
            let started = Instant::now();
            let samples = one_level(&base, streams, round, load)?;
            let wall = started.elapsed().as_secs_f64();
            let tokens: usize = samples.iter().map(|s| s.tokens).sum();
            level.aggregate.push(tokens as f64 / wall);
            level.decode.push(
                streams as f64 * samples.iter().map(Sample::decode_rate).sum::<f64>()
                    / samples.len() as f64,
            );
            level.samples.extend(samples);
        }
    }
    println!("| concurrent streams | requests | aggregate tok/s | vs first level | aggregate decode tok/s | vs first level | p50 latency s | p99 latency s | p50 TTFT s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut first_level = None;
    for (streams, level) in load.concurrency.iter().zip(&levels) {
        let (aggregate, decode) = (median(&level.aggregate), median(&level.decode));
        let (first_aggregate, first_decode) = *first_level.get_or_insert((aggregate, decode));
        let pct = |f: fn(&Sample) -> Duration, p: f64| {
            let mut v: Vec<f64> = level.samples.iter().map(|s| f(s).as_secs_f64()).collect();
            v.sort_by(f64::total_cmp);
            v[((v.len() - 1) as f64 * p).round() as usize]
        };
        println!(
            "| {streams} | {} | {aggregate:.1} | {:.2}x | {decode:.1} | {:.2}x | {:.2} | {:.2} | {:.2} |",
            level.samples.len(),
            aggregate / first_aggregate,
            decode / first_decode,
            pct(|s| s.latency, 0.5),
            pct(|s| s.latency, 0.99),
            pct(|s| s.first_token, 0.5),
        );
    }
    if in_process {
        match peak_rss_bytes() {
            Some(bytes) => println!(
                "peak RSS of this process (the server, its loaded model and the load clients): {:.0} MiB",
                bytes as f64 / (1 << 20) as f64
            ),
            None => println!("peak RSS: not available on this platform"),
        }
    }
    Ok(())
}

/// `streams` concurrent streams of `requests_per_stream` requests each.
fn one_level(base: &str, streams: usize, round: usize, load: &LoadConfig) -> Result<Vec<Sample>> {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..streams)
            .map(|w| {
                s.spawn(move || -> Result<Vec<Sample>> {
                    (0..load.requests_per_stream)
                        .map(|r| {
                            let n = (round * 1000 + w) * 1000 + r;
                            one_request(base, n, load.max_tokens)
                        })
                        .collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker thread"))
            .collect::<Result<Vec<_>>>()
            .map(|v| v.into_iter().flatten().collect())
    })
}

/// The process's high-water resident set (Linux `VmHWM`).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// One streamed chat request; distinct prompts so that no two requests are alike.
fn one_request(base: &str, n: usize, max_tokens: usize) -> Result<Sample> {
    let body = json!({
        "messages": [{"role": "user", "content": format!("Write a short story about a lighthouse keeper, number {n}.")}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let mut first_token = None;
    let mut tokens = 0;
    local_server::stream_chunks(base, "/v1/chat/completions", &body, |chunk| {
        if first_token.is_none()
            && chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        {
            first_token = Some(start.elapsed());
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    })?;
    let latency = start.elapsed();
    Ok(Sample {
        latency,
        first_token: first_token.unwrap_or(latency),
        tokens,
    })
}
