//! The layering ARCHITECTURE.md promises, checked on the source: which modules may name which. A module is a file
//! or a folder directly under `src/`; it depends on another when its code names `crate::<other>` (uses, paths and
//! doc links alike, comments aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module's code, keyed by module name, comments removed.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut code = String::new();
        for file in rust_files(&path) {
            for line in std::fs::read_to_string(file).unwrap().lines() {
                let line = line.trim_start();
                if !line.starts_with("//") {
                    code.push_str(line);
                    code.push('\n');
                }
            }
        }
        modules.insert(name, code);
    }
    modules
}

fn rust_files(path: &Path) -> Vec<std::path::PathBuf> {
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .unwrap()
            .flat_map(|entry| rust_files(&entry.unwrap().path()))
            .collect();
        files.sort();
        files
    } else if path.extension().is_some_and(|e| e == "rs") {
        vec![path.to_owned()]
    } else {
        Vec::new()
    }
}

/// The crate modules `code` names.
fn dependencies(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .map(|(at, _)| {
            code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

fn depends(module: &str) -> BTreeSet<String> {
    let modules = modules();
    let code = modules
        .get(module)
        .unwrap_or_else(|| panic!("no module {module} under src/"));
    let mut named = dependencies(code);
    named.remove(module);
    named
}

#[test]
fn the_stream_processor_serves_nothing_itself() {
    let named = depends("stream");
    for serving in ["api", "http", "server", "receipt", "cli"] {
        assert!(
            !named.contains(serving),
            "stream/ names crate::{serving}; only server.rs assembles the two"
        );
    }
}

#[test]
fn the_config_parses_without_the_api_or_the_pipeline() {
    let named = depends("config");
    for above in ["api", "http", "server", "stream", "receipt", "cli"] {
        assert!(!named.contains(above), "config.rs names crate::{above}");
    }
}

#[test]
fn leaf_modules_stay_leaves() {
    let modules = modules();
    let allowed: &[(&str, &[&str])] = &[
        ("detect", &[]),
        ("error", &[]),
        ("topic_reader", &["error"]),
        ("http", &["config", "error"]),
        ("access", &["error"]),
    ];
    for (module, may) in allowed {
        let mut named = dependencies(&modules[*module]);
        named.remove(*module);
        let extra: Vec<_> = named.iter().filter(|n| !may.contains(&n.as_str())).collect();
        assert!(
            extra.is_empty(),
            "{module} names {extra:?}; ARCHITECTURE.md allows {may:?}"
        );
    }
}

#[test]
fn no_module_below_the_server_names_it() {
    for (module, code) in modules() {
        if !["server", "cli", "main", "lib", "demo"].contains(&module.as_str()) {
            assert!(!dependencies(&code).contains("server"), "{module} names crate::server");
        }
    }
}

#[test]
fn the_audit_trail_and_the_control_topic_do_not_need_the_pipeline() {
    for module in ["audit", "control", "receipt"] {
        let named = depends(module);
        for above in ["stream", "api", "server"] {
            assert!(!named.contains(above), "{module} names crate::{above}");
        }
    }
}

#[test]
fn the_dependency_scanner_sees_uses_and_paths() {
    let named = dependencies("use crate::keys::Keyring;\nlet x = crate::stream::run(a);\n");
    assert_eq!(named, BTreeSet::from(["keys".to_owned(), "stream".to_owned()]));
}
