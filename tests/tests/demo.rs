//! The README's demo keeps working: `edge-demo --check` starts everything
//! and runs the printed curl line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[test]
fn demo_prints_a_curl_line_that_works() {
    let out = std::process::Command::new(edge_tests::bin("edge-demo")).arg("--check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("  curl --resolve web1.edge.test:"), "{stdout}");
    assert!(
        stdout.contains("Dashboard:  https://127.0.0.1:") && stdout.contains("user demo, password demo-"),
        "{stdout}"
    );
    assert!(stdout.contains("dashboard login works"), "{stdout}");
    assert!(stdout.contains("demo check passed"));
}
