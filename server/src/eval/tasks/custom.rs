//! `custom`: a user's own JSONL file, one item per line:
//! `{"prompt": "...", "choices": ["yes", "no"], "answer": "yes"}` — `answer` is a choice or its
//! index; `messages` (chat messages) may replace `prompt`; `id` is optional. Choices are scored
//! by the first token of the choice as written and with a leading space.

use crate::eval::item::{Item, Prompt, Target};
use crate::eval::tasks::sentiment::shuffle;
use anyhow::{bail, Context, Result};
use attune_models::testing::SeededRng;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    choices: Vec<String>,
    answer: Value,
}

/// Reads every item of `path`; an error names the line (1-based) and what is wrong with it.
pub fn read(path: &Path) -> Result<Vec<Item>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut items = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let item = parse_line(raw, i + 1)
            .with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        items.push(item);
    }
    if items.is_empty() {
        bail!("{} has no items", path.display());
    }
    Ok(items)
}

fn parse_line(raw: &str, number: usize) -> Result<Item> {
    let line: Line = serde_json::from_str(raw)?;
    let prompt = match (line.prompt, line.messages) {
        (Some(p), None) => Prompt::Chat(vec![json!({"role": "user", "content": p})]),
        (None, Some(m)) if !m.is_empty() => Prompt::Chat(m),
        _ => bail!("give exactly one of `prompt` or a non-empty `messages`"),
    };
    if line.choices.len() < 2 {
        bail!("`choices` needs at least two entries");
    }
    if let Some(empty) = line.choices.iter().position(|c| c.trim().is_empty()) {
        bail!("choice {empty} is empty");
    }
    let answer = match &line.answer {
        Value::String(s) => line
            .choices
            .iter()
            .position(|c| c == s)
            .with_context(|| format!("answer {s:?} is not one of the choices"))?,
        Value::Number(n) => n
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < line.choices.len())
            .with_context(|| format!("answer index {n} is not below {}", line.choices.len()))?,
        other => bail!("`answer` must be a choice or its index, not {other}"),
    };
    Ok(Item {
        id: line.id.unwrap_or_else(|| format!("line-{number}")),
        group: None,
        prompt,
        target: Target::Choice {
            forms: line
                .choices
                .iter()
                .map(|c| vec![c.clone(), format!(" {}", c.trim_start())])
                .collect(),
            names: line.choices,
            answer,
        },
    })
}

/// `n` items drawn with `seed` (all of them, in file order, when `n` covers the file).
pub fn sample(mut items: Vec<Item>, n: usize, seed: u64) -> Vec<Item> {
    if n < items.len() {
        shuffle(&mut items, &mut SeededRng::new(seed));
        items.truncate(n);
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn reads_items_and_answers_by_text_or_index() {
        let f = file(concat!(
            "{\"prompt\": \"2+2?\", \"choices\": [\"3\", \"4\"], \"answer\": \"4\"}\n",
            "\n",
            "{\"id\": \"q2\", \"messages\": [{\"role\": \"user\", \"content\": \"Sky?\"}], \"choices\": [\"blue\", \"green\"], \"answer\": 0}\n",
        ));
        let items = read(f.path()).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].id, "line-1");
        assert_eq!(items[1].id, "q2");
        match &items[0].target {
            Target::Choice { answer, forms, .. } => {
                assert_eq!(*answer, 1);
                assert_eq!(forms[1], vec!["4".to_string(), " 4".to_string()]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_malformed_line_is_named() {
        let cases = [
            (
                "{\"prompt\": \"x\", \"choices\": [\"a\", \"b\"]}",
                "missing field `answer`",
            ),
            (
                "{\"prompt\": \"x\", \"choices\": [\"a\", \"b\"], \"answer\": \"c\"}",
                "not one of the choices",
            ),
            (
                "{\"prompt\": \"x\", \"choices\": [\"a\", \"b\"], \"answer\": 2}",
                "not below 2",
            ),
            (
                "{\"prompt\": \"x\", \"choices\": [\"a\"], \"answer\": 0}",
                "at least two",
            ),
            (
                "{\"choices\": [\"a\", \"b\"], \"answer\": 0}",
                "exactly one of `prompt`",
            ),
            ("not json", "expected ident"),
        ];
        for (bad, message) in cases {
            let good = "{\"prompt\": \"ok\", \"choices\": [\"a\", \"b\"], \"answer\": \"a\"}";
            let f = file(&format!("{good}\n{good}\n{bad}\n"));
            let err = format!("{:#}", read(f.path()).unwrap_err());
            assert!(err.contains(": line 3: "), "{err}");
            assert!(err.contains(message), "{bad}: {err}");
        }
    }
}
