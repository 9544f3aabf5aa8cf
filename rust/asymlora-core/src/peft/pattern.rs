//! PEFT's rule for `rank_pattern` / `alpha_pattern` keys (its `get_pattern_key`): the
//! first key, in insertion order, whose regex matches the end of the module name at a
//! dot boundary (`^(.*\.)?(KEY)$`). asymlora's own `LoraConfig` patterns follow the same
//! rule, so this is the one implementation of it.

use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

/// Pattern keys compiled with PEFT's rule, in their order.
#[derive(Clone, Debug)]
pub struct PatternRule {
    keys: Vec<(String, Regex)>,
}

/// What PEFT's rule wraps each key in (the key is a regex matched at a dot boundary).
const KEY_PREFIX: &str = r"^(?:.*\.)?(?:";
const KEY_SUFFIX: &str = ")$";

/// The regex crate's multi-line syntax error (the pattern, a caret line under the bad
/// part, then `error: ...`) on one line, with the caret's place as a character of
/// the key: errors are one line (a log line, a CLI line).
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if let [first, pattern, caret, .., last] = lines.as_slice() {
        if *first == "regex parse error:" && caret.trim_start().starts_with('^') {
            let indent = pattern.len() - pattern.trim_start().len();
            let column = caret.chars().position(|c| c == '^').unwrap_or(0);
            let message = last.trim().strip_prefix("error: ").unwrap_or(last.trim());
            return match column.checked_sub(indent + KEY_PREFIX.chars().count()) {
                Some(at) => format!("{message} at character {} of the key", at + 1),
                None => message.to_string(),
            };
        }
    }
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A key that is not a regex the rule can evaluate (Rust's `regex` syntax: no
/// look-around or backreferences).
#[derive(Clone, Debug)]
pub struct BadPattern {
    pub key: String,
    pub message: String,
}

impl PatternRule {
    pub fn new<I, S>(keys: I) -> Result<PatternRule, BadPattern>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let keys = keys
            .into_iter()
            .map(|key| {
                let key = key.into();
                match Regex::new(&format!("{KEY_PREFIX}{key}{KEY_SUFFIX}")) {
                    Ok(re) => Ok((key, re)),
                    Err(e) => Err(BadPattern {
                        message: format!("not a regex asymlora can evaluate: {}", one_line(&e.to_string())),
                        key,
                    }),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(PatternRule { keys })
    }

    /// Index of the first key that selects `module`, if any.
    pub fn first_match(&self, module: &str) -> Option<usize> {
        self.keys.iter().position(|(_, re)| re.is_match(module))
    }

    pub fn key(&self, index: usize) -> &str {
        &self.keys[index].0
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A JSON object read with its keys in file order (the order decides which key wins);
/// `null` reads as empty.
#[derive(Clone, Debug, Default)]
pub(crate) struct OrderedMap(pub Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object or null")
            }
            fn visit_unit<E>(self) -> Result<OrderedMap, E> {
                Ok(OrderedMap::default())
            }
            fn visit_none<E>(self) -> Result<OrderedMap, E> {
                Ok(OrderedMap::default())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<OrderedMap, D::Error> {
                d.deserialize_any(V)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedMap, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_option(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_like_peft() {
        let rule = PatternRule::new(["q_proj", "layers.1.self_attn.v_proj", "^model.layers.2.*"]).unwrap();
        let get = |m: &str| rule.first_match(m);
        assert_eq!(get("model.layers.0.self_attn.q_proj"), Some(0));
        assert_eq!(get("q_proj"), Some(0));
        assert_eq!(get("model.layers.0.self_attn.xq_proj"), None, "dot boundary");
        assert_eq!(get("model.layers.1.self_attn.v_proj"), Some(1));
        assert_eq!(get("model.layers.11.self_attn.v_proj"), None);
        assert_eq!(get("model.layers.2.mlp.up_proj"), Some(2));
        let rule = PatternRule::new(["proj", "q_proj"]).unwrap();
        assert_eq!(rule.first_match("a.proj"), Some(0));
        assert_eq!(rule.first_match("a.q_proj"), Some(1), "the first matching key wins");
        assert_eq!(rule.key(1), "q_proj");
    }

    #[test]
    fn bad_keys_are_named() {
        let err = PatternRule::new(["ok", "(?=look)"]).unwrap_err();
        assert_eq!(err.key, "(?=look)");
        assert!(err.message.contains("not a regex"), "{}", err.message);
        assert!(!err.message.contains('\n'), "one line: {:?}", err.message);
        assert!(err.message.contains("look-around"), "{}", err.message);
        assert!(err.message.ends_with("at character 1 of the key"), "{}", err.message);
        let err = PatternRule::new(["layers.1.q_proj[x"]).unwrap_err();
        assert!(!err.message.contains('\n'), "one line: {:?}", err.message);
        assert!(err.message.contains("at character 16 of the key"), "{}", err.message);
    }

    #[test]
    fn ordered_map_keeps_file_order() {
        #[derive(Deserialize)]
        struct P {
            rank_pattern: OrderedMap,
            alpha_pattern: OrderedMap,
        }
        let p: P = serde_json::from_str(r#"{"rank_pattern": {"b": 1, "a": 2}, "alpha_pattern": null}"#).unwrap();
        assert_eq!(
            p.rank_pattern.0.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert!(p.alpha_pattern.0.is_empty());
    }
}
