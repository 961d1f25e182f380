//! Interventions that run more than the request's own sequence, over HTTP: contrastive decoding
//! against a second served model (`amateur`), and ZeroTuning's `auto` grid of prefills.

mod common;

use common::{default_model, Server};
use serde_json::{json, Value};
use std::path::Path;

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": "expert",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": true,
    })
}

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

/// A weak amateur that shares the default model's tokenizer: its first four layers (from the
/// f32 copy our converter makes; the other layers' weights are simply not loaded).
fn shallow_amateur(dir: &Path) {
    let full = attune_models::testing::converted_default_model();
    for entry in std::fs::read_dir(&full).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name == "config.json" {
            let mut config: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config["num_hidden_layers"] = json!(4);
            std::fs::write(dir.join(name), config.to_string()).unwrap();
        } else {
            std::os::unix::fs::symlink(&path, dir.join(name)).unwrap();
        }
    }
}

#[test]
fn amateur_contrast_runs_a_second_model_and_auto_gamma_reports_its_choice() {
    let amateur = tempfile::tempdir().unwrap();
    shallow_amateur(amateur.path());
    let config = format!(
        "[[models]]\nid = \"expert\"\nsource = {:?}\n[[models]]\nid = \"shallow\"\nsource = {:?}\n",
        default_model(),
        amateur.path()
    );
    let server = Server::start(&config, &[]);
    let mut req = chat("What is the capital of France?", 24);
    let (status, plain) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{plain}");

    // Li et al.'s CD with the shallow amateur changes the answer.
    req["interventions"] =
        json!([{"type": "contrastive_decoding", "mode": "amateur", "amateur_model": "shallow"}]);
    let (status, cd) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{cd}");
    assert_eq!(cd["interventions"][0]["rule"], "difference");
    assert_ne!(content(&plain), content(&cd), "CD should change the answer");

    // Spec sanity: an amateur identical to the expert extrapolates to the base distribution.
    req["interventions"] = json!([{"type": "contrastive_decoding", "mode": "amateur",
        "amateur_model": "expert", "rule": "extrapolate", "beta": 1.0, "alpha": 0.0}]);
    let (status, same) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{same}");
    assert_eq!(content(&plain), content(&same));

    // Weight 0 without a mask: bit-identical to no intervention.
    req["interventions"] = json!([{"type": "contrastive_decoding", "mode": "amateur",
        "amateur_model": "shallow", "lambda": 0.0, "alpha": 0.0}]);
    let (_, neutral) = server.post("/v1/chat/completions", &req);
    assert_eq!(
        plain["choices"][0]["logprobs"],
        neutral["choices"][0]["logprobs"]
    );

    // CD's ignore_prefix: the amateur sees only the last prompt token.
    req["interventions"] = json!([{"type": "contrastive_decoding", "mode": "amateur",
        "amateur_model": "shallow", "ignore_prefix": true}]);
    let (status, short) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{short}");
    assert_ne!(
        cd["choices"][0]["logprobs"], short["choices"][0]["logprobs"],
        "the amateur's context matters"
    );

    // An amateur that is not served is a 400 naming the field.
    req["interventions"] = json!([{"type": "contrastive_decoding", "mode": "amateur",
        "amateur_model": "nope", "lambda": 0.0, "alpha": 0.0}]);
    let (status, err) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "interventions[0].amateur_model");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expert, shallow"));

    // ZeroTuning auto: one prefill per grid value; the choice comes back with the answer.
    req["interventions"] = json!([{"type": "zerotuning", "auto": true}]);
    let (status, auto) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{auto}");
    let report = &auto["choices"][0]["intervention_report"]["zerotuning"];
    let grid = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0];
    let entropy: Vec<f64> = serde_json::from_value(report["entropy"].clone()).unwrap();
    assert_eq!(entropy.len(), grid.len());
    let lowest = (0..grid.len())
        .min_by(|&a, &b| entropy[a].total_cmp(&entropy[b]))
        .unwrap();
    assert_eq!(report["gamma"], json!(grid[lowest]), "{report}");
    // The answer is the chosen gamma's.
    req["interventions"] = json!([{"type": "zerotuning", "gamma": grid[lowest]}]);
    let (_, direct) = server.post("/v1/chat/completions", &req);
    assert_eq!(content(&direct), content(&auto));

    // Streaming carries the report on the choice's first chunk.
    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["interventions"] = json!([{"type": "zerotuning", "auto": {"grid": [1.0, 2.0]}}]);
    let reports: Vec<Value> = server
        .stream("/v1/chat/completions", &streamed)
        .iter()
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| chunk["choices"].get(0)?.get("intervention_report").cloned())
        .collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0]["zerotuning"]["grid"], json!([1.0, 2.0]));
}
