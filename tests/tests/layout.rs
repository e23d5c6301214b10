//! The code layout of the shipped binaries (issue 16): the functions that
//! edge-server and edge-agent run are linked together at the start of
//! `.text`, in the order of `layout/functions.txt`, so that the pages the
//! kernel maps around each fault hold code that runs. These tests read the
//! built binaries' symbol tables with `nm` and fail when the lists have gone
//! stale (dependencies updated without `scripts/layout-functions.sh`) or the
//! linker no longer applies them.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;

/// A function symbol of a binary.
struct Function {
    address: u64,
    size: u64,
    name: String,
}

fn functions(binary: &str) -> Vec<Function> {
    let path = edge_tests::bin(binary);
    let out = Command::new("nm").args(["-S", "--defined-only"]).arg(&path).output().expect("nm (binutils) runs");
    assert!(out.status.success(), "nm {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (address, size, kind, name) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
            if !matches!(kind, "t" | "T" | "w" | "W") {
                return None;
            }
            let address = u64::from_str_radix(address, 16).ok()?;
            let size = u64::from_str_radix(size, 16).ok()?;
            (size > 0).then(|| Function { address, size, name: name.to_owned() })
        })
        .collect()
}

fn listed(package: &str) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(package).join("layout/functions.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// Whether the list was made by this compiler: symbol hashes differ between
/// rustc versions, so with another one the list cannot match and only
/// loses compactness.
fn same_toolchain(package: &str) -> bool {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(package).join("layout/toolchain.txt");
    let recorded = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let out = Command::new("rustc").arg("-V").output().expect("rustc runs");
    let current = String::from_utf8_lossy(&out.stdout);
    if recorded.trim() == current.trim() {
        return true;
    }
    eprintln!("{package}/layout was made by {}, this is {}: not checked", recorded.trim(), current.trim());
    false
}

fn check(binary: &str, package: &str) {
    if !same_toolchain(package) {
        return;
    }
    let functions = functions(binary);
    let list = listed(package);
    assert!(list.len() > 1000, "{package}/layout/functions.txt lists only {} functions", list.len());
    let names: HashSet<&str> = functions.iter().map(|f| f.name.as_str()).collect();
    let present = list.iter().filter(|n| names.contains(n.as_str())).count();
    let share = present as f64 / list.len() as f64;
    assert!(
        share >= 0.7,
        "only {present} of the {} functions in {package}/layout/functions.txt exist in {binary} ({:.0}%): \
         dependencies or build flags changed their symbols; run scripts/layout-functions.sh",
        list.len(),
        share * 100.0
    );
    if std::env::var_os("EDGE_NO_LAYOUT").is_some() {
        return;
    }
    // The listed functions form one block: between the first and the last
    // of them, nearly every byte belongs to a listed function.
    let wanted: HashSet<&str> = list.iter().map(String::as_str).collect();
    let (mut start, mut end, mut listed_bytes) = (u64::MAX, 0, 0);
    for f in functions.iter().filter(|f| wanted.contains(f.name.as_str())) {
        start = start.min(f.address);
        end = end.max(f.address + f.size);
        listed_bytes += f.size;
    }
    let others_inside: u64 = functions
        .iter()
        .filter(|f| !wanted.contains(f.name.as_str()) && f.address >= start && f.address < end)
        .map(|f| f.size)
        .sum();
    let text_bytes: u64 = functions.iter().map(|f| f.size).sum();
    assert!(
        others_inside * 10 < listed_bytes,
        "{binary}: {others_inside} bytes of other functions lie among the {listed_bytes} bytes of listed ones: \
         the linker did not apply --symbol-ordering-file"
    );
    assert!(
        listed_bytes * 2 < text_bytes,
        "{binary}: the listed functions are {listed_bytes} of {text_bytes} bytes of code, not the part that runs"
    );
}

#[test]
fn server_runs_code_from_one_block() {
    check("edge-server", "server");
}

#[test]
fn agent_runs_code_from_one_block() {
    check("edge-agent", "agent");
}
