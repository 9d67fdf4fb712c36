//! Property tests of config loading: arbitrary TOML text, arbitrary
//! `RINGCAST_*` variables and arbitrary values for real keys never panic,
//! and every error is one line (what `ringcastd` prints before exiting).

use std::sync::OnceLock;

use proptest::prelude::*;
use ringcast::config::Config;

/// Every `(section, key)` of the default config, so that generated input
/// reaches the typed deserialisation and validation of real keys.
fn keys() -> &'static [(String, String)] {
    static KEYS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let text = toml::to_string(&Config::default()).expect("the default config serialises");
        let table: toml::Table = text.parse().expect("and parses back");
        let mut keys = Vec::new();
        for (section, value) in table {
            if let toml::Value::Table(t) = value {
                keys.extend(t.keys().map(|k| (section.clone(), k.clone())));
            }
        }
        // Present only when overrides are configured.
        keys.push(("topics".into(), "override".into()));
        keys
    })
}

fn key() -> impl Strategy<Value = (String, String)> {
    (0..keys().len()).prop_map(|i| keys()[i].clone())
}

/// Text that looks like the values the config takes, and some that does not.
fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| format!("{n}0")),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("true".to_owned()),
        "[0-9]{0,22}(ns|ms|s|m|h|d|day|days|w|y|x|)",
        "[0-9]{0,22}(B|KB|KiB|MiB|GiB|TiB|PB|EiB|k|)",
        "[0-9.:\\[\\]a-z]{0,40}",
        "(fsync|interval|memory|\\*|https?://[a-z.]{0,12}|[a-z*?-]{0,12})",
        "\\PC{0,30}",
    ]
}

/// A TOML value rendered from `value_text`: quoted, bare, in an array or
/// in an inline table.
fn toml_value() -> impl Strategy<Value = String> {
    (value_text(), 0..5u8).prop_map(|(v, shape)| match shape {
        0 => v,
        1 | 2 => toml::Value::String(v).to_string(),
        3 => format!("[{}]", toml::Value::String(v)),
        _ => format!("{{ pattern = {} }}", toml::Value::String(v)),
    })
}

/// A config file of real keys with generated values, sometimes with an
/// override table or a broken line.
fn config_text() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec((key(), toml_value()), 0..8),
        proptest::option::of(proptest::collection::vec(
            ("(pattern|max_events|max_age|max_bytes|other)", toml_value()),
            0..4,
        )),
        proptest::option::of("\\PC{0,20}"),
    )
        .prop_map(|(entries, override_table, junk)| {
            let mut text = String::new();
            for ((section, key), value) in entries {
                text.push_str(&format!("[{section}]\n{key} = {value}\n"));
            }
            if let Some(entries) = override_table {
                text.push_str("[[topics.override]]\n");
                for (key, value) in entries {
                    text.push_str(&format!("{key} = {value}\n"));
                }
            }
            if let Some(junk) = junk {
                text.push_str(&junk);
            }
            text
        })
}

/// `RINGCAST_*` variables: of real keys, of made-up ones, and not at all.
fn env_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        key().prop_map(|(s, k)| format!("RINGCAST_{}_{}", s, k).to_ascii_uppercase()),
        "RINGCAST_[A-Z_]{0,30}",
        "RINGCAST_\\PC{0,12}",
        "[A-Z_]{0,12}",
    ];
    proptest::collection::vec((name, value_text()), 0..6)
}

fn assert_one_line(result: Result<Config, ringcast::config::ConfigError>) {
    if let Err(e) = result {
        let message = e.to_string();
        assert!(
            !message.contains('\n'),
            "error over several lines: {message:?}"
        );
        assert!(!message.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics_and_errors_are_one_line(text in "\\PC*") {
        assert_one_line(Config::from_toml(&text).and_then(|c| c.validate().map(|()| c)));
    }

    #[test]
    fn generated_configs_never_panic_and_errors_are_one_line(text in config_text()) {
        assert_one_line(Config::from_toml(&text).and_then(|c| c.validate().map(|()| c)));
    }

    #[test]
    fn env_overrides_never_panic_and_errors_are_one_line(env in env_pairs()) {
        assert_one_line(Config::load(None, env));
    }

    #[test]
    fn files_and_env_together_never_panic_and_errors_are_one_line(
        text in config_text(),
        env in env_pairs(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringcast.toml");
        std::fs::write(&path, text).unwrap();
        assert_one_line(Config::load(Some(&path), env));
    }
}
