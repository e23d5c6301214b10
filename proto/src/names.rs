//! DNS name rules: which node names are valid and which hostnames a node owns.
//!
//! A node `n1` in zone `z` owns exactly `n1.z` and `*.n1.z` (one label deep,
//! as a wildcard certificate would). These rules are the only source of truth
//! for ownership, so an agent can never claim a name of another node.

/// Longest DNS name in presentation form, without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;

/// Lowercases and validates a hostname as sent in SNI or written in config.
///
/// Accepts letters, digits, `-` and `_` in labels of 1..=63 bytes, at most
/// [`MAX_NAME_LEN`] bytes in all. Returns `None` for anything else.
pub fn normalize_hostname(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return None;
        }
    }
    Some(name.to_ascii_lowercase())
}

/// Checks a node name: one DNS label of lowercase letters, digits and `-`,
/// not starting or ending with `-`, 1..=63 bytes.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("node name {name:?} must be 1 to 63 characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(format!("node name {name:?} may contain only lowercase letters, digits and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("node name {name:?} must not start or end with '-'"));
    }
    Ok(())
}

/// The hostnames node `node` owns in `zone`: `node.zone` and `*.node.zone`.
pub fn node_hostnames(node: &str, zone: &str) -> Vec<String> {
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    vec![format!("{node}.{zone}"), format!("*.{node}.{zone}")]
}

/// The wildcard pattern that would cover `name` (`a.b.c` → `*.b.c`).
pub fn wildcard_parent(name: &str) -> Option<String> {
    let (_, rest) = name.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    Some(format!("*.{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_and_trailing_dot() {
        assert_eq!(normalize_hostname("App.N1.Example."), Some("app.n1.example".into()));
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", ".", "a..b", "a b", "a/b", "\u{e9}.x", &"a".repeat(64), &"a.".repeat(128)] {
            assert_eq!(normalize_hostname(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn node_names() {
        assert!(validate_node_name("n1").is_ok());
        assert!(validate_node_name("web-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostnames_and_wildcards() {
        assert_eq!(node_hostnames("n1", "Z.Example."), vec!["n1.z.example", "*.n1.z.example"]);
        assert_eq!(wildcard_parent("app.n1.z"), Some("*.n1.z".into()));
        assert_eq!(wildcard_parent("z"), None);
    }
}
