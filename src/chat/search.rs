//! Pure text rules behind read state and search: whether a message mentions someone, and how a
//! user's search box text becomes an FTS5 query. No state, no SQL execution; unit-tested here.

/// Characters that continue an account name (`[A-Za-z0-9_.-]`) or a word: a mention must not
/// be followed by one (`@alicex` is not `@alice`), nor preceded by one (`mail@alice`).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `text` mentions one of `names` (an account name and a nick): `@` and the name,
/// case-insensitively, with no word character before the `@` and none right after the name
/// (a `.` or `-` right after counts as a word character only when another word character
/// follows, so `@alice.` at the end of a sentence is a mention and `@alice.smith` is not).
pub fn mentions(text: &str, names: &[&str]) -> bool {
    let lower = text.to_lowercase();
    let names: Vec<String> = names
        .iter()
        .filter(|n| !n.is_empty())
        .map(|n| n.to_lowercase())
        .collect();
    for (at, _) in lower.match_indices('@') {
        if lower[..at].chars().next_back().is_some_and(is_word) {
            continue;
        }
        let rest = &lower[at + 1..];
        for n in &names {
            let Some(after) = rest.strip_prefix(n.as_str()) else {
                continue;
            };
            let mut it = after.chars();
            let ok = match it.next() {
                None => true,
                Some(c) if is_word(c) => false,
                Some('.' | '-') => !it.next().is_some_and(is_word),
                Some(_) => true,
            };
            if ok {
                return true;
            }
        }
    }
    false
}

/// Why a search text cannot be searched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmptyQuery;

/// The FTS5 `MATCH` expression for what a person typed: every word must occur, each as a
/// prefix (`"depl"*`), and text in double quotes is a phrase (`"deploy failed"`). Words are the
/// runs of letters and digits (what the `unicode61` tokenizer indexes), so no FTS5 syntax a user
/// types (`AND`, `NEAR`, `*`, `:`, parentheses) ever reaches the query: every token is quoted.
pub fn fts_query(q: &str) -> Result<String, EmptyQuery> {
    let mut parts = Vec::new();
    for (i, chunk) in q.split('"').enumerate() {
        let words = words(chunk);
        if words.is_empty() {
            continue;
        }
        if i % 2 == 1 {
            // Inside quotes: one phrase, matched exactly (tokens in order).
            parts.push(format!("\"{}\"", words.join(" ")));
        } else {
            parts.extend(words.into_iter().map(|w| format!("\"{w}\"*")));
        }
    }
    if parts.is_empty() {
        return Err(EmptyQuery);
    }
    Ok(parts.join(" AND "))
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_need_the_name_at_a_word_boundary() {
        let me = ["alice", "Ally B"];
        for yes in [
            "@alice hi",
            "hi @Alice",
            "(@alice)",
            "@ALICE, look",
            "ping @alice.",
            "@ally b: hi",
            "yo\n@alice",
        ] {
            assert!(mentions(yes, &me), "{yes:?}");
        }
        for no in [
            "alice hi",
            "@alicex",
            "mail@alice.org",
            "@alice.smith",
            "@al",
            "@ally bob",
            "",
        ] {
            assert!(!mentions(no, &me), "{no:?}");
        }
    }

    #[test]
    fn queries_quote_every_token() {
        assert_eq!(
            fts_query("deploy failed").unwrap(),
            r#""deploy"* AND "failed"*"#
        );
        assert_eq!(
            fts_query(r#"the "deploy failed" now"#).unwrap(),
            r#""the"* AND "deploy failed" AND "now"*"#
        );
        assert_eq!(fts_query("Café").unwrap(), r#""Café"*"#);
        // FTS5 syntax typed by a user is just words.
        assert_eq!(
            fts_query("a* OR NEAR(b c) col:d").unwrap(),
            r#""a"* AND "OR"* AND "NEAR"* AND "b"* AND "c"* AND "col"* AND "d"*"#
        );
        for empty in ["", "   ", "?!", "\"\"", "*:()"] {
            assert_eq!(fts_query(empty), Err(EmptyQuery), "{empty:?}");
        }
    }
}
