//! Stop strings over streamed text: text that could still turn into a stop string is held back
//! until it is known not to, so a stop string never leaks into the output.

#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text. Returns the text that is safe to emit and whether a stop string
    /// was completed (the text up to it is returned, the stop string and the rest dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_prefix_at_end(&self.pending, s))
            .max()
            .unwrap_or(0);
        let emit = self.pending.len() - hold;
        let out = self.pending[..emit].to_string();
        self.pending.drain(..emit);
        (out, false)
    }

    /// Releases held-back text at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn longest_prefix_at_end(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&k| stop.is_char_boundary(k))
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_a_possible_stop_and_cuts_at_a_real_one() {
        let mut s = StopStrings::new(vec!["\n\nUser:".into()]);
        assert_eq!(s.push("Hello"), ("Hello".into(), false));
        assert_eq!(s.push(" there\n"), (" there".into(), false));
        assert_eq!(s.push("\nUs"), ("".into(), false));
        assert_eq!(s.push("er: more"), ("".into(), true));
    }

    #[test]
    fn released_when_it_turns_out_not_to_be_a_stop() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("the EN"), ("the ".into(), false));
        assert_eq!(s.push("D"), ("".into(), true));
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("the EN"), ("the ".into(), false));
        assert_eq!(s.push("ding"), ("ENding".into(), false));
        assert_eq!(s.push("E"), ("".into(), false));
        assert_eq!(s.flush(), "E");
    }

    #[test]
    fn multibyte_stops_are_handled() {
        let mut s = StopStrings::new(vec!["é!".into()]);
        assert_eq!(s.push("caf"), ("caf".into(), false));
        assert_eq!(s.push("é"), ("".into(), false));
        assert_eq!(s.push("!"), ("".into(), true));
    }
}
