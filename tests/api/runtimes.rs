//! The runtimes' own test suites (Node's built-in runner, Python's
//! unittest), run from here so that `cargo test --workspace` covers them.

use std::process::Command;

use crate::helpers::repo_dir;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(repo_dir())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_nodejs_runtime_passes_its_own_tests() {
    run("node", &["--test", "runtimes/nodejs/test/"]);
}

#[test]
fn the_python_runtime_passes_its_own_tests() {
    run(
        "python3",
        &[
            "-B",
            "-m",
            "unittest",
            "discover",
            "-s",
            "runtimes/python",
            "-p",
            "test_*.py",
        ],
    );
}
