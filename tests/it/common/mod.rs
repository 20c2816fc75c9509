//! Test helpers: a fake `lorascope train --json` worker written as a shell script.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes a fake worker to `dir/fake-worker.sh`. It honours `--batch-size`, `--seq-len`,
/// `--steps` and `--device`, appends `<batch_size> <CUDA_VISIBLE_DEVICES|none>` to
/// `dir/calls.log`, sleeps `step_sleep` seconds per step and prints header, step and summary
/// lines. Batch size 3 exits 3 (OOM), 5 exits 2 with a cause on stderr, 9 ignores SIGTERM
/// and hangs (needs SIGKILL); a file `dir/retry-<batch size>` makes the summary count one
/// out-of-memory retry.
pub fn fake_worker(dir: &Path, step_sleep: f64) -> PathBuf {
    let log = dir.join("calls.log");
    let script = format!(
        r#"#!/bin/sh
bs=1; seq=16; steps=4; dev=cpu
[ "$1" = "train" ] || {{ echo "expected the train subcommand" >&2; exit 64; }}
while [ $# -gt 0 ]; do
  case "$1" in
    --batch-size) bs=$2; shift ;;
    --seq-len) seq=$2; shift ;;
    --steps) steps=$2; shift ;;
    --device) dev=$2; shift ;;
  esac
  shift
done
echo "$bs ${{CUDA_VISIBLE_DEVICES:-none}}" >> "{log}"
retries=0; [ -f "{dir}/retry-$bs" ] && retries=1
case "$bs" in
  3) echo "loading model" >&2; echo "CUDA out of memory: tried to allocate 2.00 GiB" >&2; exit 3 ;;
  5) echo "loading model" >&2; echo "unsupported optimizer: adamw8bit (not implemented yet)" >&2; exit 2 ;;
  9) trap '' TERM ;;
esac
echo "{{\"type\":\"header\",\"model\":\"tiny\",\"synthetic_weights\":true,\"device\":\"$dev\"}}"
echo "a warning that is not JSON"
i=1
while [ $i -le $steps ]; do
  sleep {step_sleep}
  if [ "$bs" = 9 ]; then sleep 30; fi
  tok=$((bs * seq))
  echo "{{\"type\":\"step\",\"step\":$i,\"tokens\":$tok,\"padded_tokens\":$tok,\"target_tokens\":$tok,\"step_seconds\":0.05,\"loss\":5.$i,\"lr\":0.0001,\"loss_scale\":null,\"skipped\":false,\"extra\":1}}"
  i=$((i + 1))
done
echo "{{\"type\":\"summary\",\"status\":\"ok\",\"steps\":$steps,\"final_loss\":5.$steps,\"peak_rss_bytes\":1048576,\"oom_retries\":$retries}}"
"#,
        log = log.display(),
        dir = dir.display()
    );
    let path = dir.join("fake-worker.sh");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Lines of `dir/calls.log` (one per worker start).
pub fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A profile with the given batch sizes, one seq_len, `steps` steps.
pub fn profile(batch_sizes: &[u32], steps: u32, extra_run: &str) -> String {
    let bs: Vec<String> = batch_sizes.iter().map(|b| b.to_string()).collect();
    format!(
        "[model]\npreset = \"tiny\"\n[data]\npath = \"sample\"\n[run]\nsteps = {steps}\nwarmup_steps = 1\n{extra_run}\n[grid]\nbatch_size = [{}]\nseq_len = [16]\n",
        bs.join(", ")
    )
}

/// The tensor names and shapes of a safetensors file, sorted (adapter files compared by key).
pub fn tensor_shapes(f: &Path) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> =
        candle_core::safetensors::load(f, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.dims().to_vec()))
            .collect();
    v.sort();
    v
}
