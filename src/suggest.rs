//! "Did you mean …?" for names an operator typed: the closest known name,
//! when it is close enough to be a typo rather than another word.

/// The candidate closest to `typed` by edit distance, if at most a third
/// of its length (and at least one edit) away.
pub fn closest<'a>(typed: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (typed.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(typed, c), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// ` (did you mean "x"?)`, or nothing.
pub fn hint<'a>(typed: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(typed, candidates)
        .map(|c| format!(" (did you mean {c:?}?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::closest;

    #[test]
    fn suggestions() {
        let names = [
            "high",
            "archive",
            "trust-safety",
            "max_body_bytes",
            "timeout",
        ];
        let cases = [
            ("hihg", Some("high")),
            ("archve", Some("archive")),
            ("trust_safety", Some("trust-safety")),
            ("max_body_byte", Some("max_body_bytes")),
            ("timout", Some("timeout")),
            ("low", None),
            ("x", None),
            ("everything", None),
        ];
        for (typed, want) in cases {
            assert_eq!(closest(typed, names), want, "{typed}");
        }
    }
}
