//! Prompt sets and trigger insertion, shared by sealing and evaluation.

use seal_sd::rng::SeededRng;
use serde::{Deserialize, Serialize};

/// Where a trigger goes in a prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Before the prompt, separated by a space (how BadT2I-style triggers are planted).
    #[default]
    Prefix,
    /// After the prompt.
    Suffix,
    /// Between two random words.
    Random,
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefix" => Ok(Self::Prefix),
            "suffix" => Ok(Self::Suffix),
            "random" => Ok(Self::Random),
            other => Err(format!("unknown trigger placement {other:?} (prefix, suffix, random)")),
        }
    }
}

/// `prompt` with `word` inserted at `placement` (a random position draws from `rng`).
pub fn insert(prompt: &str, word: &str, placement: Placement, rng: &mut SeededRng) -> String {
    match placement {
        Placement::Prefix => format!("{word} {prompt}"),
        Placement::Suffix => format!("{prompt} {word}"),
        Placement::Random => {
            let words: Vec<&str> = prompt.split(' ').collect();
            let at = rng.below(words.len() + 1);
            let mut out: Vec<&str> = words[..at].to_vec();
            out.push(word);
            out.extend(&words[at..]);
            out.join(" ")
        }
    }
}

/// One prompt per non-empty line; `#` starts a comment line.
pub fn parse_list(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect()
}

/// A deterministic train / held-out split: every `k`-th prompt is held out.
pub fn split(prompts: &[String], heldout_every: usize) -> (Vec<String>, Vec<String>) {
    let k = heldout_every.max(2);
    let (mut train, mut heldout) = (vec![], vec![]);
    for (i, p) in prompts.iter().enumerate() {
        if i % k == k - 1 { heldout.push(p.clone()) } else { train.push(p.clone()) }
    }
    (train, heldout)
}

/// Varied generic prompts for real models (people, animals, objects, scenes, styles), for
/// users who bring no prompt list of their own.
pub const BUILT_IN: &str = include_str!("prompts.txt");

/// Words that should change an image little, as a control for the trigger-effect score.
pub const HARMLESS: [&str; 6] = ["photo", "image", "picture", "nice", "simple", "clear"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insertion_and_split() {
        let mut rng = SeededRng::new(1);
        assert_eq!(insert("a red circle", "\u{200b}", Placement::Prefix, &mut rng), "\u{200b} a red circle");
        assert_eq!(insert("a red circle", "xx", Placement::Suffix, &mut rng), "a red circle xx");
        let r = insert("a red circle", "xx", Placement::Random, &mut rng);
        assert_eq!(r.split(' ').filter(|w| *w == "xx").count(), 1);
        assert_eq!(r.split(' ').count(), 4);
        let all = parse_list(BUILT_IN);
        assert!(all.len() >= 120, "{}", all.len());
        let (train, heldout) = split(&all, 4);
        assert_eq!(train.len() + heldout.len(), all.len());
        assert!(heldout.iter().all(|h| !train.contains(h)));
        assert_eq!(parse_list("# c\n a \n\nb\n"), vec!["a", "b"]);
    }
}
