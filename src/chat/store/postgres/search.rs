//! Full-text search in PostgreSQL with SQLite's results: a message's text is folded here
//! (lowercase, NFKD, combining marks dropped, every run of non-alphanumerics a single space:
//! the words FTS5's `unicode61 remove_diacritics 2` tokenizer makes) and stored as
//! `to_tsvector('simple', folded)`; the FTS5 expression that [`crate::chat::search::fts_query`]
//! builds becomes a `tsquery` over tokens folded the same way.

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// The words of `text` as search indexes them, separated by single spaces.
pub fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = true;
    for c in text.nfkd().filter(|c| !is_combining_mark(*c)) {
        if c.is_alphanumeric() {
            for l in c.to_lowercase() {
                out.push(l);
            }
            space = false;
        } else if !space {
            out.push(' ');
            space = true;
        }
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

/// The `tsquery` text for an FTS5 expression made by `fts_query`: `"tok"*` (a prefix) becomes
/// `'tok':*`, `"a b"` (a phrase) `'a' <-> 'b'`, and the parts are joined with `&`. Tokens are
/// folded like the indexed text; one that folds to several words (`½` → `1 2`) is a phrase.
/// `None` when nothing searchable is left.
pub fn tsquery(fts: &str) -> Option<String> {
    let mut parts = Vec::new();
    let mut rest = fts;
    while let Some(start) = rest.find('"') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('"') else { break };
        let inner = &after[..end];
        rest = &after[end + 1..];
        let prefix = rest.starts_with('*');
        if prefix {
            rest = &rest[1..];
        }
        let words: Vec<String> = fold(inner)
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(|w| format!("'{}'", w.replace('\'', "''").replace('\\', "\\\\")))
            .collect();
        let Some(last) = words.len().checked_sub(1) else {
            continue;
        };
        let mut phrase: Vec<String> = words;
        if prefix {
            phrase[last].push_str(":*");
        }
        parts.push(if phrase.len() == 1 {
            phrase.pop().unwrap_or_default()
        } else {
            format!("({})", phrase.join(" <-> "))
        });
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(" & "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::search::fts_query;

    #[test]
    fn text_folds_to_lowercase_words_without_diacritics() {
        assert_eq!(
            fold("Café au LAIT, s'il vous plaît!"),
            "cafe au lait s il vous plait"
        );
        assert_eq!(fold("  ---  "), "");
        assert_eq!(fold("mail@alice.org"), "mail alice org");
        assert_eq!(fold("Ｆｕｌｌ"), "full");
    }

    #[test]
    fn fts5_expressions_become_tsqueries() {
        let q = |s: &str| tsquery(&fts_query(s).unwrap());
        assert_eq!(
            q("deploy failed").as_deref(),
            Some("'deploy':* & 'failed':*")
        );
        assert_eq!(
            q(r#"the "deploy failed" now"#).as_deref(),
            Some("'the':* & ('deploy' <-> 'failed') & 'now':*")
        );
        assert_eq!(q("Café").as_deref(), Some("'cafe':*"));
        assert_eq!(q("½").as_deref(), Some("('1' <-> '2':*)"));
        assert_eq!(tsquery("\"\u{301}\"*"), None);
    }
}
