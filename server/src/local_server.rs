//! A server for the client-side commands (`attune bench --serve`, `attune eval`): one started
//! in this process on a free loopback port, or one already running at a URL.

use anyhow::{bail, Context, Result};
use attune_config::AttuneConfig;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

/// Starts `attune serve` with `config` on a free loopback port in a background thread and
/// returns its base URL (not ready yet: see [`wait_ready`]).
pub fn start(mut config: AttuneConfig) -> Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    config.server.host = "127.0.0.1".into();
    config.server.port = port;
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        if let Err(e) = runtime.block_on(crate::serve::serve(config)) {
            eprintln!("attune: in-process server failed: {e:#}");
        }
    });
    Ok(format!("http://127.0.0.1:{port}"))
}

/// Waits until `base`/ready answers 200 (every model loaded), for up to five minutes; a server
/// that refuses `api_key` is an error at once.
pub fn wait_ready(base: &str, api_key: Option<&str>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let mut request = agent().get(&format!("{base}/ready"));
        if let Some(key) = api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        if let Ok(mut r) = request.call() {
            match r.status().as_u16() {
                200 => return Ok(()),
                401 => bail!(
                    "{base} refused the API key: {}",
                    r.body_mut().read_to_string().unwrap_or_default()
                ),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{base} did not become ready")
}

/// An HTTP client that hands error statuses back as responses (their bodies explain them).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs a streaming request (`"stream": true` in `body`) to `base` + `path` and hands each
/// `data:` chunk to `on_chunk`, up to `[DONE]`; a status other than 200 is an error.
pub fn stream_chunks(
    base: &str,
    path: &str,
    body: &Value,
    mut on_chunk: impl FnMut(&Value),
) -> Result<()> {
    let mut response = agent()
        .post(&format!("{base}{path}"))
        .send_json(body)
        .context("request failed")?;
    if response.status() != 200 {
        bail!(
            "server answered {}: {}",
            response.status(),
            response.body_mut().read_to_string()?
        );
    }
    for line in BufReader::new(response.body_mut().as_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        on_chunk(&serde_json::from_str(data)?);
    }
    Ok(())
}
