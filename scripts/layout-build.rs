//! Build script of edge-server and edge-agent (`build` in their Cargo.toml):
//! links the binary with the functions it runs placed first, in the order of
//! `layout/functions.txt` (made by `scripts/layout-functions.sh`), and with
//! packed relative relocations. Both cut resident memory, not speed: the
//! kernel maps code 64 KiB around each page fault, so code that runs spread
//! over the whole text keeps nearly all of it resident (docs/benchmarks.md,
//! issue 16).

use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=layout/functions.txt");
    println!("cargo::rerun-if-env-changed=EDGE_NO_LAYOUT");
    if !links_with_lld() || std::env::var_os("EDGE_NO_LAYOUT").is_some() {
        return;
    }
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else { return };
    println!("cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={dir}/layout/functions.txt");
    // Symbols of the list that this build does not have (another version of
    // a dependency) are skipped, without a warning each.
    println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    // DT_RELR (glibc 2.36+): the dynamic loader reads a few KiB of
    // relocations at start instead of about 0.8 MB.
    println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}

/// Whether rustc links this target with LLD by default: x86_64 Linux from
/// Rust 1.90 on. GNU ld, the default elsewhere, has no
/// --symbol-ordering-file; EDGE_NO_LAYOUT=1 covers toolchains configured
/// otherwise.
fn links_with_lld() -> bool {
    if std::env::var("TARGET").ok().as_deref() != Some("x86_64-unknown-linux-gnu") {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else { return false };
    let text = String::from_utf8_lossy(&out.stdout);
    let minor = text
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    matches!(minor, Some(m) if m >= 90)
}
