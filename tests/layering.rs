//! The library's modules import one way: each module uses only modules of lower layers (and
//! never the crate root), so the flow of data (load -> analyse -> plan -> build -> write and
//! check) reads the same in the code.

use std::fs;
use std::path::Path;

/// The layers, lowest first. A module may use the modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["error", "guard", "suggest"],
    &["onnx", "arrays"],
    &["analysis"],
    &["plan", "autodiff", "step"],
    &["methods", "sidecar"],
    &["joint", "gradient", "check", "report"],
    &["train"],
    &["exercise"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a file of src/ belongs to (None for lib.rs and main.rs).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_string_lossy();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<name>` a file mentions, and every name of a `use crate::{a, b}` group.
fn crate_references(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            names.extend(
                group[..end]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or("").to_string())
                    .filter(|n| !n.is_empty()),
            );
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    names
}

#[test]
fn imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let Some(module) = module_of(relative) else {
            continue;
        };
        let own = layer_of(&module).unwrap_or_else(|| {
            panic!(
                "src/{}: module `{module}` has no layer in LAYERS",
                relative.display()
            )
        });
        let text = fs::read_to_string(file).unwrap();
        for name in crate_references(&text) {
            if name == module {
                continue;
            }
            match layer_of(&name) {
                Some(layer) if layer < own => {}
                Some(_) => wrong.push(format!(
                    "src/{}: `{module}` uses `crate::{name}`, which is not below it",
                    relative.display()
                )),
                None => wrong.push(format!(
                    "src/{}: `{module}` uses `crate::{name}` from the crate root; use the module that defines it",
                    relative.display()
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_a_cycle() {
    // The checker itself: a reference upwards or to the root is found.
    assert_eq!(
        crate_references("use crate::{joint, plan::Role};"),
        ["joint", "plan"]
    );
    assert_eq!(
        crate_references("let x = crate::PreparedModel;"),
        ["PreparedModel"]
    );
    assert!(layer_of("joint") > layer_of("plan"));
    assert_eq!(layer_of("PreparedModel"), None);
}
