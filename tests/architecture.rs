//! The shape of the code base, checked on its sources: the library's top-level modules depend on
//! each other without a circle, the training application (`train`) is used only by the binary
//! and the machine check, and no function is longer than a reader takes in at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest function, in lines.
const MAX_FUNCTION_LINES: usize = 80;
/// The modules that may use the training application.
const USERS_OF_TRAIN: [&str; 2] = ["main.rs", "check.rs"];

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// A file's code: without comments and without its unit tests (from the first `#[cfg(test)]`).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The library's top-level module a file of `src/` belongs to (`checkpoint` for
/// `src/checkpoint/layout.rs`).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules `code` names through `crate::`.
fn uses(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .map(|(at, _)| {
            let rest = &code[at + "crate::".len()..];
            rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>()
        })
        .filter(|m| m.chars().next().is_some_and(char::is_lowercase))
        .collect()
}

/// Module -> the modules it uses, for the library (`lib.rs` and `main.rs` left out).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(src) {
        let module = top_module(src, &file);
        if module == "lib" || module == "main" {
            continue;
        }
        let used: Vec<String> = uses(&code(&file)).into_iter().filter(|m| *m != module).collect();
        graph.entry(module).or_default().extend(used);
    }
    graph
}

/// A circle of modules, if the graph has one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(graph, next, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

/// Every function of `code` longer than `max` lines, comments and unit tests included: (first
/// line, name, length). A function runs from its `fn` line to the first line that closes it at
/// the same indentation.
fn long_functions(code: &str, max: usize) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let words: Vec<&str> = trimmed.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "fn") else { continue };
        let before_ok = words[..at].iter().all(|w| {
            matches!(*w, "pub" | "pub(crate)" | "pub(super)" | "async" | "unsafe" | "const" | "extern")
        });
        if !before_ok || at + 1 >= words.len() || trimmed.ends_with(';') {
            continue;
        }
        let name: String = words[at + 1].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let indent = &line[..line.len() - trimmed.len()];
        let end = lines[i + 1..]
            .iter()
            .position(|l| l.starts_with(indent) && matches!(&l[indent.len()..], "}" | "};" | "})"));
        if let Some(end) = end {
            let length = end + 2;
            if length > max {
                out.push((i + 1, name, length));
            }
        }
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_library_has_no_module_circle() {
    let graph = module_graph(&root().join("src"));
    assert!(graph.contains_key("checkpoint") && graph["train"].contains("checkpoint"), "{graph:?}");
    assert_eq!(circle(&graph), None, "module graph: {graph:#?}");
    // The check itself: a circle is found.
    let mut with_circle = graph.clone();
    with_circle.entry("model".into()).or_default().insert("train".into());
    assert!(circle(&with_circle).is_some());
}

#[test]
fn only_the_binary_and_the_machine_check_use_the_training_application() {
    let src = root().join("src");
    for file in sources(&src) {
        let rel = file.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        if rel.starts_with("train/") || USERS_OF_TRAIN.contains(&rel.as_str()) {
            continue;
        }
        let code = code(&file);
        assert!(
            !uses(&code).contains("train") && !code.contains("kdmcse::train"),
            "src/{rel} uses the training application (crate::train)"
        );
    }
}

#[test]
fn no_function_is_longer_than_a_screen() {
    let mut long = Vec::new();
    for dir in ["src", "launcher/src"] {
        for file in sources(&root().join(dir)) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (line, name, length) in long_functions(&text, MAX_FUNCTION_LINES) {
                long.push(format!("{}:{line} fn {name}: {length} lines", file.display()));
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FUNCTION_LINES} lines:\n{}", long.join("\n"));
    // The check itself: a long function is found.
    let body = "    let x = 1;\n".repeat(MAX_FUNCTION_LINES);
    let sample = format!("pub fn long() {{\n{body}}}\n");
    assert_eq!(long_functions(&sample, MAX_FUNCTION_LINES), [(1, "long".to_owned(), MAX_FUNCTION_LINES + 2)]);
}
