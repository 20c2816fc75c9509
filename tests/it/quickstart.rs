//! The README's main job, end to end with the real engine: `lorascope run` (the embedded
//! quick-start profile) prints the comparison table with four `ok` points.

use std::process::Command;

#[test]
fn embedded_quickstart_sweep_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lorascope"))
        .current_dir(dir.path())
        .arg("run")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stderr: {stderr}");
    for col in ["tok/s", "s/10k tok", "peak RSS MiB", "status", "fastest: "] {
        assert!(stdout.contains(col), "missing column {col}: {stdout}");
    }
    let ok_rows = stdout
        .lines()
        .filter(|l| l.trim_end().ends_with(" ok"))
        .count();
    assert_eq!(ok_rows, 4, "{stdout}");
    assert!(dir.path().join("lorascope.db").exists());
}
