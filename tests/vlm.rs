//! A vision-language model over HTTP: the tiny LLaVA the project generates, images as OpenAI
//! `image_url` data URLs, the VLM interventions, mixed batches and bad images.

mod common;

use base64::Engine as _;
use common::{attune_ok, Server};
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tests/fixtures");

fn data_url(file: &str) -> String {
    let bytes = std::fs::read(format!("{FIXTURES}/clip_preprocess/{file}")).unwrap();
    let kind = file.rsplit('.').next().unwrap();
    format!(
        "data:image/{kind};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url}})
}

/// A greedy chat request with `parts` as the user's content.
fn chat(parts: Vec<Value>, interventions: Value) -> Value {
    json!({
        "model": "tiny-vlm",
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": true,
        "interventions": interventions,
    })
}

fn picture_question(file: &str) -> Vec<Value> {
    vec![
        image_part(&data_url(file)),
        json!({"type": "text", "text": "What is in the picture?"}),
    ]
}

/// The chosen tokens' log-probabilities.
fn logprobs(body: &Value) -> Vec<f64> {
    body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs: {body}"))
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect()
}

fn tokens(body: &Value) -> Vec<String> {
    body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect()
}

fn start_tiny_vlm(extra_config: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    attune_ok(&[
        "models",
        "make-tiny-vlm",
        dir.path().to_str().unwrap(),
        "--seed",
        "0",
    ]);
    let config = format!(
        "{extra_config}\n[[models]]\nid = \"tiny-vlm\"\nsource = {:?}\n",
        dir.path()
    );
    (Server::start(&config, &[]), dir)
}

#[test]
fn vlm_methods_change_the_output_and_are_exact_when_neutral() {
    let (server, _dir) = start_tiny_vlm("");
    let (status, plain) = server.post(
        "/v1/chat/completions",
        &chat(picture_question("noise.png"), json!([])),
    );
    assert_eq!(status, 200, "{plain}");
    // The template writes `<image>\n` (two tokens); the image token becomes 16.
    let (_, text_only) = server.post(
        "/v1/chat/completions",
        &chat(
            vec![json!({"type": "text", "text": "What is in the picture?"})],
            json!([]),
        ),
    );
    assert_eq!(
        plain["usage"]["prompt_tokens"].as_u64().unwrap(),
        text_only["usage"]["prompt_tokens"].as_u64().unwrap() + 2 + 15,
        "{plain}\n{text_only}"
    );
    let base = logprobs(&plain);

    let acting = [
        // A random model has no massive activations: a low tau makes sinks of it.
        json!({"type": "var", "tau": 1.5, "rho": 0.0, "image_mass": 0.0}),
        json!({"type": "vhr", "alpha": 3.0}),
        json!({"type": "vista", "lambda": 0.5, "gamma": 0.0}),
        json!({"type": "vista", "lambda": 0.0, "gamma": 0.5}),
        json!({"type": "contrastive_decoding", "mode": "image_noise", "beta": 2.0, "alpha": 0.0}),
        json!({"type": "carve"}),
    ];
    for spec in acting {
        let (status, body) = server.post(
            "/v1/chat/completions",
            &chat(picture_question("noise.png"), json!([spec])),
        );
        assert_eq!(status, 200, "{spec}: {body}");
        let changed = logprobs(&body)
            .iter()
            .zip(&base)
            .any(|(a, b)| (a - b).abs() > 1e-4)
            || tokens(&body) != tokens(&plain);
        assert!(changed, "{spec} left the output unchanged: {body}");
    }

    let neutral = [
        json!({"type": "var", "tau": 1.5, "rho": 0.0, "image_mass": 0.0, "transfer_fraction": 0.0}),
        json!({"type": "vhr", "alpha": 1.0}),
        json!({"type": "vista", "lambda": 0.0, "gamma": 0.0}),
        json!({"type": "contrastive_decoding", "mode": "image_noise", "beta": 0.0, "alpha": 0.0}),
        // Every pixel kept, no suffix, answer with the refined image alone: the plain request.
        json!({"type": "carve", "top_fraction": 1.0, "suffix": "", "final_images": "refined"}),
    ];
    for spec in neutral {
        let (status, body) = server.post(
            "/v1/chat/completions",
            &chat(picture_question("noise.png"), json!([spec])),
        );
        assert_eq!(status, 200, "{spec}: {body}");
        assert_eq!(logprobs(&body), base, "{spec} is not the identity");
        assert_eq!(tokens(&body), tokens(&plain));
    }

    // CARVE reports its crop of the 200 x 150 image; with every pixel kept it is the image.
    // Usage counts the prompt it answered from: the question, suffix and both images.
    for (spec, whole) in [
        (json!({"type": "carve"}), false),
        (
            json!({"type": "carve", "top_fraction": 1.0, "final_images": "refined"}),
            true,
        ),
    ] {
        let (status, body) = server.post(
            "/v1/chat/completions",
            &chat(picture_question("noise.png"), json!([spec])),
        );
        assert_eq!(status, 200, "{body}");
        let report = &body["choices"][0]["intervention_report"]["carve"];
        let bbox: Vec<u64> = report["bbox"]
            .as_array()
            .unwrap_or_else(|| panic!("no crop: {body}"))
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(bbox[0] < bbox[2] && bbox[2] <= 200 && bbox[1] < bbox[3] && bbox[3] <= 150);
        assert!(report["steps"].as_u64().unwrap() >= 1, "{report}");
        let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
        let plain_tokens = plain["usage"]["prompt_tokens"].as_u64().unwrap();
        if whole {
            assert!(prompt_tokens > plain_tokens, "{body}");
        } else {
            assert!(prompt_tokens > plain_tokens + 16, "{body}");
        }
        if whole {
            assert_eq!(bbox, vec![0, 0, 200, 150]);
            assert_eq!(report["regions"], 1);
        }
    }
    let two_images = vec![
        image_part(&data_url("noise.png")),
        image_part(&data_url("gradient.png")),
        json!({"type": "text", "text": "Which is brighter?"}),
    ];
    for (parts, interventions) in [
        (two_images, json!([{"type": "carve"}])),
        (
            picture_question("noise.png"),
            json!([{"type": "carve"}, {"type": "vhr"}]),
        ),
    ] {
        let (status, body) = server.post("/v1/chat/completions", &chat(parts, interventions));
        assert_eq!(status, 400, "{body}");
    }

    // VHR reports the heads it reinforced; VLM methods refuse a request without an image.
    let (_, body) = server.post(
        "/v1/chat/completions",
        &chat(picture_question("noise.png"), json!([{"type": "vhr"}])),
    );
    let heads = &body["choices"][0]["intervention_report"]["vhr"]["heads"];
    assert_eq!(heads.as_object().unwrap().len(), 4, "{body}");
    for spec in [
        json!({"type": "var"}),
        json!({"type": "vhr"}),
        json!({"type": "vista"}),
        json!({"type": "contrastive_decoding", "mode": "image_noise"}),
    ] {
        let req = chat(
            vec![json!({"type": "text", "text": "Hello"})],
            json!([spec]),
        );
        let (status, body) = server.post("/v1/chat/completions", &req);
        assert_eq!(status, 400, "{spec}: {body}");
        assert_eq!(body["error"]["param"], "interventions[0]", "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has none"));
    }
}

#[test]
fn image_requests_batch_with_text_requests_and_bad_images_are_refused() {
    let (server, _dir) = start_tiny_vlm("[server]\nmax_images = 2\nmax_image_pixels = 10000");
    let image_req = chat(picture_question("gradient.png"), json!([]));
    let steered_req = chat(picture_question("gradient.png"), json!([{"type": "vhr"}]));
    let text_req = chat(
        vec![json!({"type": "text", "text": "Tell me a story."})],
        json!([]),
    );
    let alone: Vec<Value> = [&image_req, &steered_req, &text_req]
        .iter()
        .map(|r| server.post("/v1/chat/completions", r).1)
        .collect();
    // The same requests in flight together share batched steps; greedy answers must not move.
    for _ in 0..3 {
        let together: Vec<Value> = std::thread::scope(|s| {
            let handles: Vec<_> = [&image_req, &steered_req, &text_req]
                .into_iter()
                .map(|r| s.spawn(|| server.post("/v1/chat/completions", r).1))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b) in alone.iter().zip(&together) {
            assert_eq!(tokens(a), tokens(b), "{a}\n{b}");
        }
    }

    // Two choices of one request share one encoding of their image.
    let encodes = |server: &Server| -> u64 {
        let (_, metrics) = server.get("/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("attune_image_encode_seconds_count "))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    let before = encodes(&server);
    let mut two = image_req.clone();
    two["n"] = json!(2);
    let (status, body) = server.post("/v1/chat/completions", &two);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"], body["choices"][1]["message"]);
    assert_eq!(encodes(&server), before + 1);

    let garbage = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"not an image at all")
    );
    let cases = [
        (vec![image_part(&garbage)], "messages[0].content[0]"),
        (
            vec![
                json!({"type": "text", "text": "Look:"}),
                image_part("https://example.invalid/a.png"),
            ],
            "messages[0].content[1]",
        ),
        // 200 x 150 pixels are over the configured 10000.
        (
            vec![
                image_part(&data_url("gradient.png")),
                image_part(&data_url("noise.png")),
            ],
            "messages[0].content[1]",
        ),
        (
            vec![
                image_part(&data_url("gradient.png")),
                image_part(&data_url("gradient.png")),
                image_part(&data_url("gradient.png")),
            ],
            "messages[0].content[2]",
        ),
    ];
    for (parts, param) in cases {
        let (status, body) = server.post("/v1/chat/completions", &chat(parts, json!([])));
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    // Still serving, and the other formats decode.
    for file in ["gradient.png", "photo.jpg", "photo.webp", "anim.gif"] {
        let req = chat(vec![image_part(&data_url(file))], json!([]));
        let (status, body) = server.post("/v1/chat/completions", &req);
        assert_eq!(status, 200, "{file}: {body}");
    }
}

/// A minimal HTTP file server on a free port: `/allowed/noise.png` (the fixture),
/// `/allowed/big.png` (150 kB), `/allowed/moved.png` (a redirect), anything else 404.
fn file_server() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let noise = std::fs::read(format!("{FIXTURES}/clip_preprocess/noise.png")).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&request);
            let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, extra, body) = match path.as_str() {
                "/allowed/noise.png" => ("200 OK", "", noise.clone()),
                "/allowed/big.png" => ("200 OK", "", vec![0u8; 150_000]),
                "/allowed/moved.png" => ("302 Found", "Location: /private/noise.png\r\n", vec![]),
                _ => ("404 Not Found", "", vec![]),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    port
}

#[test]
fn remote_images_come_only_from_allowed_prefixes() {
    let port = file_server();
    let base = format!("http://127.0.0.1:{port}");
    let (server, _dir) = start_tiny_vlm(&format!(
        "[server]\nimage_url_prefixes = [\"{base}/allowed/\"]\nmax_image_bytes = 100000"
    ));
    let ask = |url: String| {
        let req = chat(
            vec![
                image_part(&url),
                json!({"type": "text", "text": "What is it?"}),
            ],
            json!([]),
        );
        server.post("/v1/chat/completions", &req)
    };
    let (status, fetched) = ask(format!("{base}/allowed/noise.png"));
    assert_eq!(status, 200, "{fetched}");
    // The same picture inline gives the same answer.
    let (_, inline) = ask(data_url("noise.png"));
    assert_eq!(tokens(&fetched), tokens(&inline));
    for (path, expected) in [
        ("/private/noise.png", "allowed prefixes"),
        ("/allowed/missing.png", "HTTP 404"),
        ("/allowed/moved.png", "HTTP 302"),
        ("/allowed/big.png", "larger than the 100000-byte limit"),
    ] {
        let (status, body) = ask(format!("{base}{path}"));
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["param"], "messages[0].content[0]", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{path}: {message}");
    }
}
