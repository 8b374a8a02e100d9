//! Records the git revision the binaries are built from, for `--version`: `$KDMCSE_GIT_REVISION`
//! when set (a Docker build, whose context has no `.git`), else `git rev-parse`, else "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KDMCSE_GIT_REVISION");
    let revision = std::env::var("KDMCSE_GIT_REVISION").ok().filter(|r| !r.is_empty()).or_else(|| {
        let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!("cargo:rustc-env=KDMCSE_GIT_REVISION={}", revision.as_deref().unwrap_or("unknown"));
    // A new commit moves HEAD or the branch it names.
    let git = Path::new(".git");
    if git.is_dir() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/packed-refs");
        if let Some(branch) = std::fs::read_to_string(git.join("HEAD"))
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_owned()))
        {
            println!("cargo:rerun-if-changed=.git/{branch}");
        }
    }
}
