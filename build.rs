//! Records the git commit the binary is built from (`SANCTUM_GIT_COMMIT`), for output attestations.
//! Builds outside a git checkout (a crate download) record none.

use std::path::Path;
use std::process::Command;

fn main() {
    // A commit moves HEAD's branch file (or packed-refs), not HEAD itself: watch all three.
    for path in [".git/HEAD", ".git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(reference) = head.strip_prefix("ref: ")
    {
        let reference = format!(".git/{}", reference.trim());
        if Path::new(&reference).exists() {
            println!("cargo:rerun-if-changed={reference}");
        }
    }
    println!("cargo:rerun-if-env-changed=SANCTUM_GIT_COMMIT");
    let commit = std::env::var("SANCTUM_GIT_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    if let Some(commit) = commit.filter(|c| !c.is_empty()) {
        println!("cargo:rustc-env=SANCTUM_GIT_COMMIT={commit}");
    }
}
