//! `attune eval`: measures what an intervention does on a labeled task. Every configuration runs
//! on the same items through the public HTTP API (a server started in this process, or one at
//! `--url`); the report gives each configuration's accuracy with a 95% Wilson interval and, against
//! no intervention, the paired difference with its interval and an exact McNemar test.

mod client;
mod item;
mod plot;
mod progress;
pub mod stats;
pub mod tasks;

use crate::local_server;
use anyhow::{bail, Context, Result};
use attune_config::AttuneConfig;
use client::Client;
use item::{Item, Outcome};
use progress::ProgressBar;
use serde::Serialize;
use serde_json::{json, Value};
use stats::{paired, wilson, Interval, Paired};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Which task, with its own settings.
#[derive(Debug, Clone)]
pub enum TaskChoice {
    Sentiment {
        variant: tasks::sentiment::Variant,
        min_confidence: f64,
    },
    Passkey {
        contexts: Vec<usize>,
        depths: Vec<f64>,
    },
    Custom {
        file: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub task: TaskChoice,
    /// Items (passkey: per context length and depth).
    pub n: usize,
    pub seed: u64,
    /// `--interventions`: `[NAME=]JSON`, a list or one object, each one configuration.
    pub interventions: Vec<String>,
    /// `--sweep METHOD.PARAM=V1,V2,...`.
    pub sweep: Option<String>,
    pub url: Option<String>,
    pub api_key: Option<String>,
    pub output: PathBuf,
    /// Where the sweep plot goes (default: the output's path with `.svg`).
    pub plot: Option<PathBuf>,
    pub concurrency: usize,
}

/// One set of interventions the items run under.
#[derive(Debug, Clone, Serialize)]
pub struct Configuration {
    pub name: String,
    pub interventions: Value,
    /// The swept parameter's value, for sweep configurations.
    pub swept: Option<f64>,
}

/// A configuration's results.
#[derive(Debug, Serialize)]
struct Summary {
    configuration: Configuration,
    correct: usize,
    n: usize,
    accuracy: f64,
    ci: Interval,
    /// Against the first configuration (no intervention); absent for that one.
    vs_baseline: Option<Paired>,
    items_per_second: f64,
    /// Per group (passkey: context length and depth), in the items' order.
    groups: Vec<GroupSummary>,
    outcomes: Vec<Outcome>,
}

#[derive(Debug, Serialize)]
struct GroupSummary {
    group: String,
    correct: usize,
    n: usize,
    accuracy: f64,
    ci: Interval,
}

pub fn run(options: &EvalOptions, config: AttuneConfig) -> Result<()> {
    let configurations = configurations(&options.interventions, options.sweep.as_deref())?;
    let in_process = options.url.is_none();
    let base = match &options.url {
        Some(url) => url.clone(),
        None => local_server::start(config.clone())?,
    };
    local_server::wait_ready(base.trim_end_matches('/'), options.api_key.as_deref())?;
    let client = Client::new(&base, options.api_key.clone());
    let model = client.default_model()?;
    let items = load_items(options, &config, &client)?;
    eprintln!(
        "attune eval: {} items x {} configurations on `{model}` at {}",
        items.len(),
        configurations.len(),
        client.base()
    );
    let progress = ProgressBar::new(items.len() * configurations.len());
    let mut summaries: Vec<Summary> = Vec::new();
    for configuration in configurations {
        progress.set_label(&configuration.name);
        let started = Instant::now();
        let outcomes = run_items(
            &client,
            &items,
            &configuration,
            options.concurrency,
            &progress,
        )
        .with_context(|| format!("configuration `{}`", configuration.name))?;
        let seconds = started.elapsed().as_secs_f64();
        let baseline = summaries.first().map(|b| &b.outcomes);
        summaries.push(summarize(
            configuration,
            &items,
            outcomes,
            baseline,
            seconds,
        ));
    }
    let task = task_description(options);
    print_report(&task, &model, options, &summaries);
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "task": task,
        "model": model,
        "server": if in_process { "in-process".to_string() } else { base.clone() },
        "n": items.len(),
        "seed": options.seed,
        "configurations": summaries,
    });
    write_file(&options.output, &serde_json::to_string_pretty(&report)?)?;
    println!("\nresults: {}", options.output.display());
    if let Some(parameter) = &options.sweep {
        let plot = options
            .plot
            .clone()
            .unwrap_or_else(|| options.output.with_extension("svg"));
        let points: Vec<plot::SweepPoint> = summaries
            .iter()
            .filter_map(|s| {
                Some(plot::SweepPoint {
                    value: s.configuration.swept?,
                    accuracy: s.accuracy,
                    ci: s.ci,
                })
            })
            .collect();
        let base = &summaries[0];
        let title = format!("{task} on {model}, n = {}", items.len());
        let parameter = parameter.split('=').next().unwrap_or(parameter);
        let svg = plot::sweep_svg(&title, parameter, &points, (base.accuracy, base.ci));
        write_file(&plot, &svg)?;
        println!("plot: {}", plot.display());
    }
    Ok(())
}

fn load_items(options: &EvalOptions, config: &AttuneConfig, client: &Client) -> Result<Vec<Item>> {
    let items = match &options.task {
        TaskChoice::Sentiment {
            variant,
            min_confidence,
        } => {
            let corpus = tasks::sentiment::corpus(&config.cache_dir())?;
            let tweets = tasks::sentiment::read_corpus(&corpus)?;
            tasks::sentiment::items(&tweets, *variant, options.n, options.seed, *min_confidence)?
        }
        TaskChoice::Passkey { contexts, depths } => {
            tasks::passkey::items(client, contexts, depths, options.n, options.seed)?
        }
        TaskChoice::Custom { file } => {
            tasks::custom::sample(tasks::custom::read(file)?, options.n, options.seed)
        }
    };
    if items.is_empty() {
        bail!("the task has no items (check --n)");
    }
    Ok(items)
}

fn task_description(options: &EvalOptions) -> String {
    match &options.task {
        TaskChoice::Sentiment {
            variant,
            min_confidence,
        } => format!(
            "sentiment ({}, confidence >= {min_confidence})",
            match variant {
                tasks::sentiment::Variant::Binary => "binary",
                tasks::sentiment::Variant::ThreeWay => "three-way",
            }
        ),
        TaskChoice::Passkey { contexts, depths } => {
            format!("passkey (contexts {contexts:?}, depths {depths:?})")
        }
        TaskChoice::Custom { file } => format!("custom ({})", file.display()),
    }
}

/// The configurations: no intervention first, then each `--interventions`, then the sweep.
pub fn configurations(raw: &[String], sweep: Option<&str>) -> Result<Vec<Configuration>> {
    let mut out = vec![Configuration {
        name: "no intervention".into(),
        interventions: json!([]),
        swept: None,
    }];
    for arg in raw {
        // `NAME=JSON`: JSON starts with `[` or `{`, so a name is whatever comes before `=`.
        let (name, text) = match arg.find(['[', '{']) {
            Some(start) if start > 0 => {
                let prefix = arg[..start].trim();
                let name = prefix.strip_suffix('=').with_context(|| {
                    format!("--interventions {arg:?}: expected JSON or NAME=JSON")
                })?;
                (Some(name.trim().to_string()), &arg[start..])
            }
            _ => (None, arg.as_str()),
        };
        let value: Value = serde_json::from_str(text)
            .with_context(|| format!("--interventions {arg:?} is not valid JSON"))?;
        let list = match value {
            Value::Array(_) => value,
            Value::Object(_) => json!([value]),
            _ => bail!("--interventions {arg:?}: give an object or a list of objects"),
        };
        out.push(Configuration {
            name: name.unwrap_or_else(|| describe(&list)),
            interventions: list,
            swept: None,
        });
    }
    if let Some(sweep) = sweep {
        let (target, values) = sweep
            .split_once('=')
            .context("--sweep: expected METHOD.PARAM=V1,V2,...")?;
        let (method, param) = target
            .split_once('.')
            .context("--sweep: expected METHOD.PARAM=V1,V2,... (e.g. zerotuning.gamma=1,2)")?;
        for v in values.split(',') {
            let value: f64 = v
                .trim()
                .parse()
                .with_context(|| format!("--sweep: `{v}` is not a number"))?;
            let mut spec = json!({"type": method});
            spec[param] = json!(value);
            out.push(Configuration {
                name: format!("{method} {param}={value}"),
                interventions: json!([spec]),
                swept: Some(value),
            });
        }
    }
    Ok(out)
}

/// A short name for a list of interventions: each type with its other parameters.
fn describe(list: &Value) -> String {
    let parts: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|spec| {
            let mut params = spec.clone();
            let name = params["type"].as_str().unwrap_or("?").to_string();
            if let Some(map) = params.as_object_mut() {
                map.remove("type");
                if !map.is_empty() {
                    return format!("{name} {params}");
                }
            }
            name
        })
        .collect();
    if parts.is_empty() {
        "no intervention".into()
    } else {
        parts.join(" + ")
    }
}

/// Every item under one configuration, `concurrency` requests at a time, in item order.
fn run_items(
    client: &Client,
    items: &[Item],
    configuration: &Configuration,
    concurrency: usize,
    progress: &ProgressBar,
) -> Result<Vec<Outcome>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; items.len()]);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= items.len() || failure.lock().expect("not poisoned").is_some() {
                    return;
                }
                match items[i].evaluate(client, &configuration.interventions) {
                    Ok(outcome) => {
                        results.lock().expect("not poisoned")[i] = Some(outcome);
                        progress.tick();
                    }
                    Err(e) => {
                        failure.lock().expect("not poisoned").get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().expect("not poisoned") {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .expect("not poisoned")
        .into_iter()
        .map(|o| o.expect("every item ran"))
        .collect())
}

fn summarize(
    configuration: Configuration,
    items: &[Item],
    outcomes: Vec<Outcome>,
    baseline: Option<&Vec<Outcome>>,
    seconds: f64,
) -> Summary {
    let correct = outcomes.iter().filter(|o| o.correct).count();
    let n = outcomes.len();
    let mut groups: Vec<(String, usize, usize)> = Vec::new();
    for (item, outcome) in items.iter().zip(&outcomes) {
        if let Some(group) = &item.group {
            let at = match groups.iter().position(|g| &g.0 == group) {
                Some(at) => at,
                None => {
                    groups.push((group.clone(), 0, 0));
                    groups.len() - 1
                }
            };
            groups[at].1 += usize::from(outcome.correct);
            groups[at].2 += 1;
        }
    }
    let flags = |o: &[Outcome]| o.iter().map(|o| o.correct).collect::<Vec<_>>();
    Summary {
        vs_baseline: baseline.map(|b| paired(&flags(b), &flags(&outcomes))),
        configuration,
        correct,
        n,
        accuracy: correct as f64 / n as f64,
        ci: wilson(correct, n),
        items_per_second: n as f64 / seconds,
        groups: groups
            .into_iter()
            .map(|(group, correct, n)| GroupSummary {
                group,
                correct,
                n,
                accuracy: correct as f64 / n as f64,
                ci: wilson(correct, n),
            })
            .collect(),
        outcomes,
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn interval(i: &Interval) -> String {
    format!("[{:.1}, {:.1}]", i.low * 100.0, i.high * 100.0)
}

fn print_report(task: &str, model: &str, options: &EvalOptions, summaries: &[Summary]) {
    println!(
        "task: {task} | model: {model} | items: {} | seed: {}",
        summaries[0].n, options.seed
    );
    println!();
    println!("| configuration | accuracy | 95% CI | vs no intervention | 95% CI | McNemar p (exact) | only baseline / only this right | items/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for s in summaries {
        let paired = match &s.vs_baseline {
            None => "| | | | ".to_string(),
            Some(p) => format!(
                "| {:+.1} pts | {} | {} | {} / {} ",
                p.difference * 100.0,
                interval(&p.difference_ci),
                format_p(p.p_value),
                p.baseline_only,
                p.other_only
            ),
        };
        println!(
            "| {} | {} | {} {paired}| {:.2} |",
            s.configuration.name,
            pct(s.accuracy),
            interval(&s.ci),
            s.items_per_second
        );
    }
    let groups: Vec<&str> = summaries[0]
        .groups
        .iter()
        .map(|g| g.group.as_str())
        .collect();
    if groups.is_empty() {
        return;
    }
    println!();
    println!("| configuration | {} |", groups.join(" | "));
    println!("|---|{}", "---:|".repeat(groups.len()));
    for s in summaries {
        let cells: Vec<String> = s
            .groups
            .iter()
            .map(|g| format!("{} {}", pct(g.accuracy), interval(&g.ci)))
            .collect();
        println!("| {} | {} |", s.configuration.name, cells.join(" | "));
    }
}

fn format_p(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

fn write_file(path: &std::path::Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_from_flags() {
        let configs = configurations(
            &[
                r#"{"type": "act"}"#.into(),
                r#"dola=[{"type": "contrastive_decoding", "mode": "dola"}]"#.into(),
            ],
            Some("zerotuning.gamma=0.5,2"),
        )
        .unwrap();
        let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "no intervention",
                "act",
                "dola",
                "zerotuning gamma=0.5",
                "zerotuning gamma=2"
            ]
        );
        assert_eq!(configs[1].interventions, json!([{"type": "act"}]));
        assert_eq!(
            configs[4].interventions,
            json!([{"type": "zerotuning", "gamma": 2.0}])
        );
        assert_eq!(configs[4].swept, Some(2.0));
        assert!(configurations(&["{oops".into()], None).is_err());
        assert!(configurations(&[], Some("gamma=1")).is_err());
        assert!(configurations(&[], Some("zerotuning.gamma=x")).is_err());
    }
}
