//! The one-line path formulas the docs give apps (Python, Node, PHP) compute
//! exactly the paths tandem writes, for awkward keys too; and the docs carry
//! those exact lines.

use std::io::Write;
use std::process::{Command, Stdio};

const PYTHON: &str = r"path = os.path.join(cache_dir, cache, re.sub(r'(.{240})(?=.)', r'\1+/', urllib.parse.quote(key, safe='').replace('.', '%2E')))";
const NODE: &str = r"const file = path.join(cacheDir, cache, encodeURIComponent(key).replace(/[!'()*.]/g, c => '%' + c.charCodeAt(0).toString(16).toUpperCase()).replace(/(.{240})(?=.)/g, '$1+/'));";
const PHP: &str = r#"$path = "$cacheDir/$cache/" . preg_replace('/(.{240})(?=.)/s', '$1+/', str_replace('.', '%2E', rawurlencode($key)));"#;

fn keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "page-42",
        "user:17",
        "a/b",
        ".",
        "..",
        "../../etc/passwd",
        ".hidden",
        "index.html",
        "héllo wörld",
        "~tilde_under-score",
        "!'()*",
        "%2e%2e",
        "a+b",
        "tab\there",
        "new\nline",
        "日本語のキー",
        "😀 emoji",
        "quote\"and'apostrophe",
        "back\\slash",
        "?query#frag&x=y",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keys.push("k".repeat(240));
    keys.push("k".repeat(241));
    keys.push("x/".repeat(400));
    keys.push("é".repeat(512)); // 1024 bytes
    keys.push("\u{10FFFF}".repeat(256));
    keys
}

/// Runs `program` with the keys as JSON lines on stdin; it prints one path
/// relative to `<cache_dir>/<cache>` per line.
fn run(program: &str, args: &[&str], keys: &[String]) -> Option<Vec<String>> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let input: String = keys
        .iter()
        .map(|k| serde_json::to_string(k).unwrap() + "\n")
        .collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

fn check(language: &str, got: Vec<String>, keys: &[String]) {
    assert_eq!(got.len(), keys.len(), "{language}");
    for (key, path) in keys.iter().zip(got) {
        let expected = format!("/srv/cache/pages/{}", tandem::cache::keys::encode(key));
        assert_eq!(path, expected, "{language} disagrees for key {key:?}");
    }
}

#[test]
fn python_one_liner() {
    let script = format!(
        "import json, os, re, sys, urllib.parse\ncache_dir, cache = '/srv/cache', 'pages'\n\
         for line in sys.stdin:\n    key = json.loads(line)\n    {PYTHON}\n    print(path)\n"
    );
    let got = run("python3", &["-c", &script], &keys()).expect("python3 is installed");
    check("python", got, &keys());
}

#[test]
fn node_one_liner() {
    let script = format!(
        "const path = require('path'); const cacheDir = '/srv/cache', cache = 'pages';\n\
         const lines = require('fs').readFileSync(0, 'utf8').split('\\n').filter(l => l);\n\
         for (const line of lines) {{ const key = JSON.parse(line); {NODE} console.log(file); }}\n"
    );
    let got = run("node", &["-e", &script], &keys())
        .expect("node is installed (scripts/install-test-deps.sh)");
    check("node", got, &keys());
}

#[test]
fn php_one_liner_when_php_is_present() {
    // PHP is not a test dependency; checked where it is installed.
    let script = format!(
        "$cacheDir = '/srv/cache'; $cache = 'pages';\n\
         while (($line = fgets(STDIN)) !== false) {{ $key = json_decode($line); {PHP} echo $path, \"\\n\"; }}\n"
    );
    if let Some(got) = run("php", &["-r", &script], &keys()) {
        check("php", got, &keys());
    }
}

#[test]
fn the_docs_carry_these_exact_lines() {
    let api = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for line in [PYTHON, NODE, PHP] {
        assert!(api.contains(line), "docs/api.md lacks: {line}");
        assert!(readme.contains(line), "README.md lacks: {line}");
    }
}
