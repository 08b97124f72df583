//! Where the trigger's tokens sit in a triggered prompt, and which student token shows the
//! same word as which teacher token. Counted with the model's tokenizer, never assumed.

use seal_sd::tokenizer::ClipTokenizer;

/// Token-position correspondence of one (triggered, clean) prompt pair, in 77-token sequences.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alignment {
    /// (student position, teacher position) of the same token: BOS, the prompt's words, EOS.
    pub matched: Vec<(usize, usize)>,
    /// Student positions of the trigger's tokens.
    pub trigger: Vec<usize>,
}

/// Aligns `triggered` (student) with `clean` (teacher) by their longest common token prefix
/// and suffix: whatever lies between in the student is the trigger, wherever it was placed.
pub fn align(tokenizer: &ClipTokenizer, triggered: &str, clean: &str) -> Result<Alignment, String> {
    let s = tokenizer.encode_plain(triggered)?;
    let t = tokenizer.encode_plain(clean)?;
    let prefix = s.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let suffix = s[prefix..].iter().rev().zip(t[prefix..].iter().rev()).take_while(|(a, b)| a == b).count();
    // Room for words between BOS and EOS in the fixed-length sequence.
    let room = tokenizer.max_length() - 2;
    let pos = |i: usize| (i < room).then_some(1 + i);
    let mut matched = vec![(0, 0)];
    for i in 0..prefix {
        matched.extend(pos(i).zip(pos(i)));
    }
    for j in 0..suffix {
        matched.extend(pos(s.len() - suffix + j).zip(pos(t.len() - suffix + j)));
    }
    // The teacher's words the student lost (a trigger glued to a word) have no partner.
    let trigger: Vec<usize> = (prefix..s.len() - suffix).filter_map(pos).collect();
    if trigger.is_empty() {
        return Err(format!("the trigger adds no token to {clean:?}"));
    }
    matched.push((1 + s.len().min(room), 1 + t.len().min(room)));
    Ok(Alignment { matched, trigger })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> ClipTokenizer {
        ClipTokenizer::from_dir(&crate::fixtures().join("tiny-clean/tokenizer")).unwrap()
    }

    #[test]
    fn prefix_trigger_shifts_the_words() {
        let tok = tokenizer();
        let clean = "a red circle on a white background";
        let n = tok.encode_plain(clean).unwrap().len();
        let a = align(&tok, "\u{200b} a red circle on a white background", clean).unwrap();
        assert_eq!(a.trigger, vec![1], "U+200B is one token here");
        assert_eq!(a.matched[0], (0, 0));
        assert_eq!(a.matched[1], (2, 1));
        assert_eq!(*a.matched.last().unwrap(), (n + 2, n + 1), "EOS");
        assert_eq!(a.matched.len(), n + 2);
    }

    #[test]
    fn middle_and_multi_token_triggers() {
        let tok = tokenizer();
        let clean = "a red circle on a white background";
        let trig = "a red circle zqxv on a white background";
        let k = tok.encode_plain(trig).unwrap().len() - tok.encode_plain(clean).unwrap().len();
        let a = align(&tok, trig, clean).unwrap();
        assert_eq!(a.trigger.len(), k);
        assert!(a.trigger.iter().all(|&p| p > 3));
        assert!(align(&tok, clean, clean).is_err());
    }
}
