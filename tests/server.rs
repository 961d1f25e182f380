//! `attune serve` over HTTP: the OpenAI API, interventions, batching, limits, errors, metrics.

mod common;

use common::{agent, default_model, Server};
use serde_json::{json, Value};
use std::thread;

const DEFAULT_CONFIG: &str = "";

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn content(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn chat_completion_has_openai_shape_and_is_deterministic_when_greedy() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let (status, body) = server.post("/v1/chat/completions", &chat("Name a color.", 12));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(["stop", "length"].contains(&body["choices"][0]["finish_reason"].as_str().unwrap()));
    let (_, again) = server.post("/v1/chat/completions", &chat("Name a color.", 12));
    assert_eq!(content(&body), content(&again));

    let (_, models) = server.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
}

#[test]
fn streaming_adds_up_to_the_whole_answer_and_reports_usage() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let mut req = chat("Write one sentence about rain.", 24);
    let (_, whole) = server.post("/v1/chat/completions", &req);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/chat/completions", &req);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content(&whole));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"], whole["usage"]);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&whole["choices"][0]["finish_reason"]]);
}

#[test]
fn completions_with_logprobs_stop_strings_and_n() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"prompt": "The first three letters are A, B,", "max_tokens": 6, "temperature": 0, "logprobs": 3}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let lp = &body["choices"][0]["logprobs"];
    let n = lp["tokens"].as_array().unwrap().len();
    assert_eq!(n, 6);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    // The chosen token is the most likely one when greedy.
    let chosen = lp["token_logprobs"][0].as_f64().unwrap();
    let best = lp["top_logprobs"][0]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert!((chosen - best).abs() < 1e-6);

    let text = body["choices"][0]["text"].as_str().unwrap().to_string();
    let cut = text.trim_start().chars().next().unwrap().to_string();
    let (_, stopped) = server.post(
        "/v1/completions",
        &json!({"prompt": "The first three letters are A, B,", "max_tokens": 6, "temperature": 0, "stop": [cut]}),
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert!(!stopped["choices"][0]["text"]
        .as_str()
        .unwrap()
        .contains(&cut));

    let (_, many) = server.post(
        "/v1/completions",
        &json!({"prompt": ["Hello", "Goodbye"], "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 5}),
    );
    let indexes: Vec<u64> = many["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![0, 1, 2, 3]);
}

#[test]
fn interventions_are_per_request_echoed_and_neutral_parameters_change_nothing() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let prompt = "What is the capital of France?";
    let mut req = chat(prompt, 20);
    req["logprobs"] = json!(true);
    let (_, plain) = server.post("/v1/chat/completions", &req);
    req["interventions"] = json!([{"type": "zerotuning", "gamma": 1.0}]);
    let (_, neutral) = server.post("/v1/chat/completions", &req);
    assert_eq!(
        plain["choices"][0]["logprobs"], neutral["choices"][0]["logprobs"],
        "gamma = 1 must be bit-identical"
    );
    assert_eq!(neutral["interventions"][0]["type"], "zerotuning");
    assert_eq!(
        neutral["interventions"][0]["layers"]
            .as_array()
            .unwrap()
            .len(),
        30
    );
    req["interventions"] = json!([{"type": "zerotuning", "gamma": 3.0}]);
    let (status, steered) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200);
    assert_ne!(
        content(&plain),
        content(&steered),
        "gamma = 3 should change the answer"
    );

    // ACT (prompt calibration by default) changes the answer too; beta = 1 is a no-op.
    req["interventions"] = json!([{"type": "act", "beta": 1.0}]);
    let (_, act_neutral) = server.post("/v1/chat/completions", &req);
    assert_eq!(
        plain["choices"][0]["logprobs"],
        act_neutral["choices"][0]["logprobs"]
    );
    req["interventions"] = json!([{"type": "act", "beta": 0.0, "threshold": 0.05}]);
    let (status, act) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{act}");
    assert_eq!(
        act["interventions"][0]["layers"].as_array().unwrap().len(),
        27
    );
    assert_ne!(
        plain["choices"][0]["logprobs"], act["choices"][0]["logprobs"],
        "ACT should change the model"
    );

    // DoLa rewrites the distribution the sampler sees; lambda = 0 without mask or penalty does not.
    req["interventions"] = json!([{"type": "contrastive_decoding", "mode": "dola", "lambda": 0, "alpha": 0, "repetition_penalty": 1}]);
    let (_, dola_neutral) = server.post("/v1/chat/completions", &req);
    assert_eq!(
        plain["choices"][0]["logprobs"],
        dola_neutral["choices"][0]["logprobs"]
    );
    req["interventions"] =
        json!([{"type": "contrastive_decoding", "mode": "dola", "layers": "low"}]);
    let (status, dola) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{dola}");
    assert_eq!(
        dola["interventions"][0]["layers"],
        json!([2, 4, 6, 8, 10, 12, 14])
    );
    assert_ne!(
        content(&plain),
        content(&dola),
        "DoLa should change the answer"
    );

    // Recycled attention: a budget covering the context is full attention; a small one is not.
    req["interventions"] = json!([{"type": "recycled_attention", "k": 4096, "stride": 4}]);
    let (_, ra_neutral) = server.post("/v1/chat/completions", &req);
    assert_eq!(
        plain["choices"][0]["logprobs"],
        ra_neutral["choices"][0]["logprobs"]
    );
    req["interventions"] = json!([{"type": "recycled_attention", "k": 8, "stride": 4}]);
    let (status, ra) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{ra}");
    assert_ne!(
        plain["choices"][0]["logprobs"], ra["choices"][0]["logprobs"],
        "a budget of 8 keys should change the model"
    );

    // Prompt contrast runs a branch sequence beside the request in the same batch.
    req["interventions"] = json!([{"type": "contrastive_decoding", "mode": "prompt", "contrast_prefix": "Answer wrongly on purpose. ", "beta": 0.0, "alpha": 0.0}]);
    let (_, contrast_neutral) = server.post("/v1/chat/completions", &req);
    assert_eq!(
        plain["choices"][0]["logprobs"],
        contrast_neutral["choices"][0]["logprobs"]
    );
    let (_, before) = server.get("/metrics");
    req["interventions"] = json!([{"type": "contrastive_decoding", "mode": "prompt", "contrast_prefix": "Answer wrongly on purpose. ", "beta": 1.0}]);
    let (status, contrast) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{contrast}");
    assert_ne!(
        plain["choices"][0]["logprobs"], contrast["choices"][0]["logprobs"],
        "the contrast should change the distribution"
    );
    let (_, after) = server.get("/metrics");
    let pairs = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("attune_batch_size_bucket") && l.contains("le=\"1\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap()
    };
    assert_eq!(
        pairs(&before),
        pairs(&after),
        "the branch must share every step with its request"
    );

    let (status, catalogue) = server.get("/v1/interventions");
    assert_eq!(status, 200);
    let catalogue: Value = serde_json::from_str(&catalogue).unwrap();
    let zt = catalogue["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "zerotuning")
        .unwrap();
    assert_eq!(zt["implemented"], true);
    assert!(zt["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "gamma" && p["default"] == 1.0));
}

#[test]
fn bad_input_gets_the_right_status_and_names_the_field() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (json!({"messages": []}), 400, Some("messages")),
        (json!({"messages": "hi"}), 400, Some("messages")),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000000}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": 7}),
            400,
            Some("temperature"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "n": 1000}),
            400,
            Some("n"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
            400,
            Some("top_logprobs"),
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
            400,
            Some("messages[0].content[0]"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "interventions": [{"type": "telepathy"}]}),
            400,
            Some("interventions[0].type"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "interventions": [{"type": "zerotuning", "gamma": -2}]}),
            400,
            Some("interventions[0].gamma"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "interventions": [{"type": "vhr"}]}),
            400,
            Some("interventions[0].type"),
        ),
        (
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
            404,
            Some("model"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "word ".repeat(9000)}]}),
            400,
            Some("messages"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "score_token_ids": [3, 49152]}),
            400,
            Some("score_token_ids"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "score_token_ids": [3, 3]}),
            400,
            Some("score_token_ids"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "interventions": [{"type": "contrastive_decoding", "mode": "amateur", "amateur_model": "other"}]}),
            400,
            Some("interventions[0].amateur_model"),
        ),
    ];
    for (body, status, param) in cases {
        let (got, err) = server.post("/v1/chat/completions", &body);
        assert_eq!(got, status, "{body} -> {err}");
        assert_eq!(err["error"]["param"].as_str(), param, "{body} -> {err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    let over = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "word ".repeat(9000)}]}),
        )
        .1;
    assert_eq!(over["error"]["code"], "context_length_exceeded");
    assert!(over["error"]["message"].as_str().unwrap().contains("8192"));

    let mut r = agent()
        .post(&server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .send("{not json")
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r
        .body_mut()
        .read_to_string()
        .unwrap()
        .contains("not valid JSON"));
    // A body over the limit gets 413 (sent whole: the server stops reading at the limit).
    let (status, body) = send_body(&server, "/v1/completions", (16 << 20) + 64);
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("larger than the 16777216-byte limit"),
        "{body}"
    );

    // The tokenizer routes check their input the same way.
    for (path, body, param) in [
        ("/tokenize", json!({}), "prompt"),
        (
            "/tokenize",
            json!({"prompt": "x", "messages": []}),
            "prompt",
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        ("/detokenize", json!({"tokens": [1, 99999999]}), "tokens"),
        ("/detokenize", json!({"tokens": "abc"}), "tokens"),
    ] {
        let (got, err) = server.post(path, &body);
        assert_eq!(got, 400, "{path} {body} -> {err}");
        assert_eq!(err["error"]["param"], param, "{path} {body} -> {err}");
    }

    // Still serving.
    let (status, _) = server.post("/v1/chat/completions", &chat("Hi", 2));
    assert_eq!(status, 200);
}

#[test]
fn api_keys_guard_everything_but_health_and_metrics() {
    let server = Server::start(DEFAULT_CONFIG, &["--api-key", "sekrit"]);
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get("/metrics").0, 200);
    let (status, body) = server.get("/v1/models");
    assert_eq!(status, 401);
    assert!(body.contains("Missing API key"));
    let wrong = agent()
        .get(&server.url("/v1/models"))
        .header("authorization", "Bearer nope")
        .call()
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = agent()
        .get(&server.url("/v1/models"))
        .header("authorization", "Bearer sekrit")
        .call()
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = Server::start(
        "[server]\nmax_batch_size = 1\nmax_n = 1\nmax_queue = 1\nretry_after_secs = 2\n",
        &[],
    );
    let base = server.base.clone();
    let statuses: Vec<(u16, Option<String>)> = thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let base = base.clone();
                s.spawn(move || {
                    let r = agent()
                        .post(&format!("{base}/v1/completions"))
                        .send_json(json!({"prompt": "Count:", "max_tokens": 40, "temperature": 0}))
                        .unwrap();
                    let retry = r
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    (r.status().as_u16(), retry)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().any(|s| s.0 == 200), "{statuses:?}");
    let rejected: Vec<_> = statuses.iter().filter(|s| s.0 == 429).collect();
    assert!(!rejected.is_empty(), "{statuses:?}");
    assert!(rejected.iter().all(|s| s.1.as_deref() == Some("2")));
}

#[test]
fn sixteen_concurrent_streams_with_mixed_interventions_match_running_alone() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let prompts = [
        "Tell me about cats.",
        "What is 2+2?",
        "Name a fruit.",
        "Describe the sea.",
    ];
    let interventions = [
        json!([]),
        json!([
            {"type": "zerotuning", "gamma": 2.0},
            {"type": "contrastive_decoding", "mode": "prompt", "contrast_prefix": "Be vague. "},
        ]),
        json!([{"type": "act"}, {"type": "zerotuning", "gamma": 0.5, "layers": [0, 1, 2]}]),
        json!([{"type": "contrastive_decoding", "mode": "dola"}]),
    ];
    let requests: Vec<Value> = (0..16)
        .map(|i| {
            let mut r = chat(prompts[i % 4], 16);
            r["interventions"] = interventions[i / 4].clone();
            r
        })
        .collect();
    let alone: Vec<String> = requests
        .iter()
        .map(|r| content(&server.post("/v1/chat/completions", r).1))
        .collect();
    let together: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r["stream"] = json!(true);
                let server = &server;
                s.spawn(move || {
                    server
                        .stream("/v1/chat/completions", &r)
                        .iter()
                        .filter(|e| *e != "[DONE]")
                        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                        .filter_map(|c| {
                            c["choices"].get(0)?["delta"]["content"]
                                .as_str()
                                .map(str::to_string)
                        })
                        .collect::<String>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
    // Mixed batches really happened.
    let (_, metrics) = server.get("/metrics");
    let batched = metrics
        .lines()
        .find(|l| l.starts_with("attune_batch_size_bucket") && l.contains("le=\"1\""))
        .unwrap();
    let total = metrics
        .lines()
        .find(|l| l.starts_with("attune_batch_size_count"))
        .unwrap();
    let n = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    assert!(
        n(batched) < n(total),
        "every step ran alone: {batched} / {total}"
    );
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let server = Server::start("[server]\nmax_batch_size = 1\nmax_n = 1\n", &[]);
    {
        let mut r = agent()
            .post(&server.url("/v1/completions"))
            .send_json(json!({"prompt": "Once upon a time", "max_tokens": 4000, "stream": true, "temperature": 0}))
            .unwrap();
        let mut reader = r.body_mut().as_reader();
        let mut first = [0u8; 64];
        std::io::Read::read(&mut reader, &mut first).unwrap();
    } // connection dropped mid-stream
      // With the slot still taken, this would wait for 4000 tokens (minutes).
    let started = std::time::Instant::now();
    let (status, _) = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(status, 200);
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn metrics_cover_requests_tokens_and_interventions() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let mut req = chat("Hi", 3);
    req["interventions"] = json!([{"type": "zerotuning", "gamma": 2}]);
    server.post("/v1/chat/completions", &req);
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "attune_requests_total{endpoint=\"chat_completions\",status=\"200\"} 1",
        "attune_request_duration_seconds_bucket",
        "attune_time_to_first_token_seconds_bucket",
        "attune_inter_token_latency_seconds_bucket",
        "attune_prompt_tokens_total",
        "attune_generated_tokens_total{model=\"SmolLM2-135M-Instruct.Q4_1\"} 3",
        "attune_queue_depth",
        "attune_running_sequences",
        "attune_batch_size_bucket",
        "attune_kv_cache_bytes",
        "attune_intervention_requests_total{intervention=\"zerotuning\"} 1",
        "attune_intervention_hook_seconds_total{intervention=\"zerotuning\"",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    check_with_promtool(&text);
}

/// `promtool check metrics` (Debian package `prometheus`); CI sets ATTUNE_REQUIRE_PROMTOOL.
fn check_with_promtool(text: &str) {
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match promtool {
        Ok(c) => c,
        Err(_) if std::env::var_os("ATTUNE_REQUIRE_PROMTOOL").is_none() => {
            eprintln!("promtool not installed: skipping `promtool check metrics`");
            return;
        }
        Err(e) => panic!("promtool is required here: {e}"),
    };
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let url = server.url("/v1/completions");
    let in_flight = thread::spawn(move || {
        let mut r = agent()
            .post(&url)
            .send_json(json!({"prompt": "Count to ten:", "max_tokens": 30, "temperature": 0}))
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    });
    thread::sleep(std::time::Duration::from_millis(400));
    let base = server.base.clone();
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    let (code, body) = in_flight.join().unwrap();
    assert_eq!(code, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(!body["choices"][0]["finish_reason"].is_null());
    assert!(
        agent().get(&format!("{base}/health")).call().is_err(),
        "still accepting after exit"
    );
}

#[test]
fn every_route_in_the_openapi_document_is_served() {
    let server = Server::start(DEFAULT_CONFIG, &[]);
    let (status, doc) = server.get("/openapi.json");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 9);
    for (path, ops) in paths {
        let url = server.url(&path.replace("{id}", "SmolLM2-135M-Instruct.Q4_1"));
        for method in ops.as_object().unwrap().keys() {
            let mut r = match method.as_str() {
                "get" => agent().get(&url).call().unwrap(),
                "post" => agent().post(&url).send_json(json!({})).unwrap(),
                other => panic!("unexpected method {other}"),
            };
            let body = r.body_mut().read_to_string().unwrap();
            assert!(
                !body.contains("No route for"),
                "{method} {path} is documented but not served"
            );
        }
    }
}

#[test]
fn several_configured_models_are_listed_and_served_by_id() {
    let path = default_model();
    let config = format!(
        "[[models]]\nid = \"small\"\nsource = {path:?}\n[[models]]\nid = \"small-copy\"\nsource = {path:?}\n"
    );
    let server = Server::start(&config, &[]);
    let (_, list) = server.get("/v1/models");
    let list: Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["small", "small-copy"]);
    for id in ["small", "small-copy"] {
        let mut req = chat("Hi", 3);
        req["model"] = json!(id);
        let (status, body) = server.post("/v1/chat/completions", &req);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model"], id);
    }
    assert_eq!(server.get("/v1/models/small-copy").0, 200);
    assert_eq!(server.get("/v1/models/other").0, 404);
}

#[test]
fn a_request_past_its_timeout_gets_503_and_the_server_goes_on() {
    // Long enough for a one-token answer on a loaded CI machine; the first request can never end before it
    // because its end-of-sequence tokens are banned and it asks for thousands of tokens.
    let server = Server::start("[server]\nrequest_timeout_secs = 5\n", &[]);
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0,
                "logit_bias": {"0": -100, "2": -100}}),
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{body}"
    );
    let (status, _) = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1}));
    assert_eq!(status, 200);
}

/// Sends a JSON body of exactly `length` bytes and returns the status and body of the answer.
fn send_body(server: &Server, path: &str, length: usize) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = server.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let open = "{\"prompt\": \"";
    let body = format!("{open}{}\"}}", "a".repeat(length - open.len() - 2));
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{body}"
    )
    .unwrap();
    // Read until the response's own Content-Length is complete (the connection may stay open).
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap_or(0);
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        let complete = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
            head.lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .is_some_and(|len| body.len() >= len)
        });
        if n == 0 || complete {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&raw).into_owned();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[test]
fn prompts_prefilled_in_pieces_give_the_answers_of_one_piece() {
    // On the f32 copy of the default model: with 8-bit activations (the GGUF), the attention
    // products' other shapes in pieces change last bits that the activation rounding amplifies.
    let f32_model = attune_models::testing::converted_default_model();
    let models = format!("[[models]]\nid = \"m\"\nsource = {f32_model:?}\n");
    let whole = Server::start(&models, &[]);
    let pieces = Server::start(
        &format!("[server]\nprefill_chunk_tokens = 7\n{models}"),
        &[],
    );
    let mut req = chat(
        "Name three colors of the rainbow and say why the sky is blue.",
        12,
    );
    req["logprobs"] = json!(true);
    for interventions in [
        json!([]),
        // The contrast branch's prompt is longer than the request's: both end their prefill in
        // the same step.
        json!([{"type": "contrastive_decoding", "mode": "prompt", "contrast_prefix": "Answer wrongly on purpose, in a long and winding way. "}]),
        json!([{"type": "zerotuning", "gamma": 2.0}, {"type": "contrastive_decoding", "mode": "dola"}]),
    ] {
        req["interventions"] = interventions.clone();
        let (status, a) = whole.post("/v1/chat/completions", &req);
        assert_eq!(status, 200, "{a}");
        let (status, b) = pieces.post("/v1/chat/completions", &req);
        assert_eq!(status, 200, "{b}");
        assert_eq!(content(&a), content(&b), "{interventions}");
        let logprobs = |v: &Value| -> Vec<f64> {
            v["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY))
                .collect()
        };
        for (x, y) in logprobs(&a).iter().zip(logprobs(&b)) {
            assert!(
                (x - y).abs() < 1e-4 || x == &y,
                "{interventions}: {x} vs {y}"
            );
        }
    }
}

/// The prefix cache: a prompt sharing a kept prompt's start copies those positions and answers
/// exactly as a server without the cache does; requests with hooks neither use nor fill it.
#[test]
fn prompts_sharing_a_prefix_reuse_its_cache_and_answer_as_without_it() {
    let cached = Server::start(DEFAULT_CONFIG, &[]);
    let uncached = Server::start("[server]\nprefix_cache_bytes = 0\n", &[]);
    let system = "You are a patient teacher. Answer in one short sentence, plainly, without lists.";
    let ask = |question: &str| {
        let mut req = json!({
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": true,
        });
        req["top_logprobs"] = json!(2);
        req
    };
    let cached_tokens = |server: &Server| -> f64 {
        let (_, text) = server.get("/metrics");
        text.lines()
            .find(|l| l.starts_with("attune_prompt_cached_tokens_total{"))
            .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
    };
    let first = ask("Why is the sky blue?");
    assert_eq!(cached.post("/v1/chat/completions", &first).0, 200);
    assert_eq!(cached_tokens(&cached), 0.0);
    // Same system prompt, another question: the shared start is copied.
    let second = ask("What makes leaves green?");
    let (status, warm) = cached.post("/v1/chat/completions", &second);
    assert_eq!(status, 200, "{warm}");
    let reused = cached_tokens(&cached);
    assert!(reused >= 16.0, "{reused} prompt tokens reused");
    let (_, cold) = uncached.post("/v1/chat/completions", &second);
    assert_eq!(cold["choices"][0]["message"], warm["choices"][0]["message"]);
    assert_eq!(
        cold["choices"][0]["logprobs"],
        warm["choices"][0]["logprobs"]
    );
    assert_eq!(cached_tokens(&uncached), 0.0);
    // With an intervention that hooks the model, the cache is left alone.
    let mut hooked = ask("What makes leaves green?");
    hooked["interventions"] = json!([{"type": "zerotuning", "gamma": 2.0}]);
    assert_eq!(cached.post("/v1/chat/completions", &hooked).0, 200);
    assert_eq!(cached_tokens(&cached), reused);
    let (_, metrics) = cached.get("/metrics");
    assert!(
        metrics.contains("attune_prefix_cache_bytes{model="),
        "{metrics}"
    );
}
