//! `attune eval` as a user runs it: label scoring checked against a computation of our own from
//! the model's logits, the report's shape, the sentiment data, and clear errors for bad files.

mod common;

use attune_models::{default_device, Model, ModelSource};
use common::{attune, attune_ok, default_model, stderr, stdout, Server};
use serde_json::{json, Value};

const ITEMS: &str = r#"{"prompt": "Is the sky blue on a clear day? Answer yes or no.", "choices": ["yes", "no"], "answer": "yes"}
{"prompt": "What is 2 + 2? Answer with the number only.", "choices": ["3", "4", "5"], "answer": 1}
{"id": "capital", "messages": [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Capital of France: Paris or Rome?"}], "choices": ["Paris", "Rome"], "answer": "Paris"}
"#;

/// ln(sum(exp(x))).
fn log_sum_exp(values: &[f64]) -> f64 {
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// Each choice's score by hand: the model's next-token log-softmax after the chat prompt,
/// summed over the first tokens of the choice as written and with a leading space (unless that
/// first token is only the space).
fn scores_by_hand(model: &Model, messages: &[Value], choices: &[&str]) -> Vec<f64> {
    let prompt = model.chat_prompt(messages).unwrap();
    let mut cache = model.decoder.new_cache();
    let logits: Vec<f32> = model
        .decoder
        .forward_one(&prompt, &mut cache, None)
        .unwrap()
        .to_vec1()
        .unwrap();
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    choices
        .iter()
        .map(|c| {
            let mut firsts: Vec<u32> = [c.to_string(), format!(" {c}")]
                .iter()
                .map(|form| model.tokenizer.encode(form, false).unwrap()[0])
                .filter(|&t| {
                    !model
                        .tokenizer
                        .decode(&[t], false)
                        .unwrap()
                        .trim()
                        .is_empty()
                })
                .collect();
            firsts.dedup();
            let lps: Vec<f64> = firsts
                .iter()
                .map(|&t| logits[t as usize] as f64 - lse)
                .collect();
            log_sum_exp(&lps)
        })
        .collect()
}

#[test]
fn custom_task_scores_labels_like_a_hand_computation_and_reports_paired_tests() {
    let gguf = default_model();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("items.jsonl");
    std::fs::write(&file, ITEMS).unwrap();
    let output = dir.path().join("out.json");
    let out = attune_ok(&[
        "eval",
        "custom",
        "--model",
        gguf.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--sweep",
        "zerotuning.gamma=1,3",
    ]);
    let table = stdout(&out);
    assert!(table.contains("| no intervention | "), "{table}");
    assert!(table.contains("| zerotuning gamma=3 | "), "{table}");
    assert!(table.contains("McNemar p (exact)"), "{table}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let configs = report["configurations"].as_array().unwrap();
    assert_eq!(configs.len(), 3);
    let model = Model::load(&ModelSource::Gguf(gguf), &default_device().unwrap()).unwrap();
    let lines: Vec<Value> = ITEMS
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let baseline = &configs[0]["outcomes"];
    for (line, outcome) in lines.iter().zip(baseline.as_array().unwrap()) {
        let messages = match line.get("messages") {
            Some(m) => m.as_array().unwrap().clone(),
            None => vec![json!({"role": "user", "content": line["prompt"]})],
        };
        let choices: Vec<&str> = line["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let expected = scores_by_hand(&model, &messages, &choices);
        let got: Vec<f64> = serde_json::from_value(outcome["label_logprobs"].clone()).unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-3, "{got:?} vs {expected:?}");
        }
        let best = (0..expected.len())
            .max_by(|&a, &b| expected[a].total_cmp(&expected[b]))
            .unwrap();
        assert_eq!(outcome["answer"], choices[best]);
        let answer = match &line["answer"] {
            Value::String(s) => choices.iter().position(|c| c == s).unwrap(),
            n => n.as_u64().unwrap() as usize,
        };
        assert_eq!(outcome["correct"], best == answer);
    }
    // gamma = 1 is the baseline exactly: same answers, no discordant items, p = 1.
    assert_eq!(configs[1]["outcomes"], configs[0]["outcomes"]);
    assert_eq!(configs[1]["vs_baseline"]["p_value"], 1.0);
    let correct = configs[0]["correct"].as_u64().unwrap() as f64;
    assert_eq!(configs[0]["accuracy"], correct / 3.0);
    // The sweep plot is written beside the results.
    let svg = std::fs::read_to_string(output.with_extension("svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("zerotuning.gamma"));
}

#[test]
fn a_malformed_custom_file_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.jsonl");
    let good = ITEMS.lines().next().unwrap();
    std::fs::write(
        &file,
        format!("{good}\n{{\"prompt\": \"x\", \"choices\": [\"a\", \"b\"], \"answer\": \"c\"}}\n"),
    )
    .unwrap();
    let out = attune()
        .args(["eval", "custom", "--file", file.to_str().unwrap()])
        .args(["--model", default_model().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bad.jsonl: line 2"), "{err}");
    assert!(
        err.contains("answer \"c\" is not one of the choices"),
        "{err}"
    );
}

#[test]
fn sentiment_fetches_the_pinned_corpus_and_samples_balanced_items() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("sentiment.json");
    let out = attune_ok(&[
        "eval",
        "sentiment",
        "--model",
        default_model().to_str().unwrap(),
        "--n",
        "6",
        "--seed",
        "3",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        stdout(&out).contains("sentiment (binary"),
        "{}",
        stdout(&out)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let outcomes = report["configurations"][0]["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 6);
    // Balanced: as many positive as negative items (the right label is the answer when
    // correct, the other one when not).
    let positives = outcomes
        .iter()
        .filter(|o| (o["answer"] == "positive") == o["correct"].as_bool().unwrap())
        .count();
    assert_eq!(positives, 3);
}

#[test]
fn passkey_reports_accuracy_by_context_length_and_depth() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("passkey.json");
    let out = attune_ok(&[
        "eval",
        "passkey",
        "--model",
        default_model().to_str().unwrap(),
        "--contexts",
        "200,400",
        "--depths",
        "0.25,0.75",
        "--n",
        "1",
        "--interventions",
        r#"ra={"type": "recycled_attention", "k": 64, "stride": 4}"#,
        "--output",
        output.to_str().unwrap(),
    ]);
    let table = stdout(&out);
    assert!(
        table.contains("| configuration | 200 tokens, depth 0.25 | 200 tokens, depth 0.75 | 400 tokens, depth 0.25 | 400 tokens, depth 0.75 |"),
        "{table}"
    );
    assert!(table.contains("| ra | "), "{table}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let outcomes = report["configurations"][0]["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 4);
    for o in outcomes {
        // Right exactly when the answer holds the key named in the item's id.
        let key = o["id"].as_str().unwrap().rsplit("key").next().unwrap();
        assert_eq!(o["correct"], o["answer"].as_str().unwrap().contains(key));
    }
}

#[test]
fn eval_runs_against_a_running_server_with_its_api_key() {
    let server = Server::start("", &["--api-key", "sekrit"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("items.jsonl");
    std::fs::write(&file, ITEMS).unwrap();
    let output = dir.path().join("remote.json");
    let run = |key: &str| {
        attune()
            .args(["eval", "custom", "--url", &server.base, "--api-key", key])
            .args(["--file", file.to_str().unwrap()])
            .args(["--output", output.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let refused = run("wrong");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("Invalid API key"),
        "{}",
        stderr(&refused)
    );
    let out = run("sekrit");
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    assert_eq!(report["server"], server.base.as_str());
    assert_eq!(report["n"], 3);
}
