//! "Did you mean" suggestions: the names closest to a mistyped one by edit distance.

/// The `count` candidates closest to `wanted`, closest first.
pub fn nearest<'a>(
    wanted: &str,
    candidates: impl Iterator<Item = &'a str>,
    count: usize,
) -> Vec<&'a str> {
    let mut scored: Vec<(usize, &str)> =
        candidates.map(|c| (edit_distance(wanted, c), c)).collect();
    scored.sort();
    scored.into_iter().take(count).map(|(_, c)| c).collect()
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_names_come_first() {
        let names = ["layer1_out", "layer2_out", "logits"];
        assert_eq!(
            nearest("layer2_ou", names.into_iter(), 2),
            vec!["layer2_out", "layer1_out"]
        );
    }

    #[test]
    fn distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
