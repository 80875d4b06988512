//! Look-alike names: two names that render alike must not belong to two people.
//!
//! Names are compared by keys built from the Unicode TS #39 confusable *skeleton* after NFKC
//! (fullwidth `ｍ` → `m`) and case folding: the skeleton maps Cyrillic `а` → `a`, `1` → `l`,
//! `rn` → `m`. Case and skeleton do not commute, so a name has two keys and two names collide
//! when any key is shared: lowercase first (`ALICE` meets `alice`), and skeleton first (`aIice`
//! with a capital I meets `alice` before lowercasing would turn the I into an `i`). Keys are
//! only ever compared, never shown.

use std::collections::HashMap;

use unicode_normalization::UnicodeNormalization;
use unicode_security::confusable_detection::skeleton;

/// The comparison keys of a name or nick (see the module docs): one or two strings.
pub fn skeleton_keys(s: &str) -> Vec<String> {
    let nfkc: String = s.nfkc().collect();
    let folded: String = skeleton(&nfkc.to_lowercase()).collect();
    let first: String = skeleton(&nfkc).collect();
    let shaped: String = skeleton(&first.to_lowercase()).collect();
    if shaped == folded {
        vec![folded]
    } else {
        vec![folded, shaped]
    }
}

/// Whether two names look alike.
pub fn look_alike(a: &str, b: &str) -> bool {
    let kb = skeleton_keys(b);
    skeleton_keys(a).iter().any(|k| kb.contains(k))
}

/// Which users hold a name whose key is K. Usually one per key; a database written before
/// this rule may hold several, and none of them may then lend theirs to a newcomer.
#[derive(Default, Debug)]
pub struct SkeletonIndex {
    holders: HashMap<String, Vec<String>>,
}

impl SkeletonIndex {
    /// Records that `user` holds the name whose keys are `keys`.
    pub fn insert(&mut self, keys: &[String], user: &str) {
        for key in keys {
            let v = self.holders.entry(key.clone()).or_default();
            if !v.iter().any(|u| u == user) {
                v.push(user.to_string());
            }
        }
    }

    pub fn remove(&mut self, keys: &[String], user: &str) {
        for key in keys {
            if let Some(v) = self.holders.get_mut(key) {
                v.retain(|u| u != user);
                if v.is_empty() {
                    self.holders.remove(key);
                }
            }
        }
    }

    /// Whether a user other than `user` holds a name sharing one of `keys`.
    pub fn held_by_other(&self, keys: &[String], user: &str) -> bool {
        keys.iter().any(|key| {
            self.holders
                .get(key)
                .is_some_and(|v| v.iter().any(|u| u != user))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_alikes_share_a_key() {
        for s in [
            "Mark",
            "MARK",
            "M\u{0430}rk",
            "ｍａｒｋ",
            "rnark",
            "Ｍａｒｋ",
            "mark",
        ] {
            assert!(look_alike(s, "mark"), "{s:?}");
            assert!(look_alike("mark", s), "{s:?}");
        }
        for s in ["aIice", "a1ice", "ALICE", "Alice", "al\u{0456}ce", "alice"] {
            assert!(look_alike(s, "alice"), "{s:?}");
            assert!(look_alike("alice", s), "{s:?}");
        }
    }

    #[test]
    fn different_names_differ() {
        for (a, b) in [
            ("mark", "mars"),
            ("alice", "alicia"),
            ("bob", "rob"),
            ("ann", "anna"),
            ("carol", "dave"),
        ] {
            assert!(!look_alike(a, b), "{a} vs {b}");
        }
    }

    #[test]
    fn index_tells_other_holders() {
        let mut ix = SkeletonIndex::default();
        ix.insert(&skeleton_keys("alice"), "alice");
        assert!(!ix.held_by_other(&skeleton_keys("ALICE"), "alice"));
        assert!(ix.held_by_other(&skeleton_keys("aIice"), "bob"));
        assert!(ix.held_by_other(&skeleton_keys("a1ice"), "bob"));
        ix.remove(&skeleton_keys("alice"), "alice");
        assert!(!ix.held_by_other(&skeleton_keys("alice"), "bob"));
    }
}
