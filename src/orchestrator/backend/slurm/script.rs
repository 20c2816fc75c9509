//! The batch script of one submission and the `sbatch` command line that submits it. Pure:
//! the script is text, written and submitted by [`super::SlurmBackend`].
//!
//! One submission is one job array: task `i` runs the `i`-th point of the submission as
//! `WORKER train ... --json --telemetry`, appending its JSON lines to `DIR/<entry>.jsonl` and
//! its stderr to `DIR/<entry>.err` (DIR = `<workdir>/<sweep id>`); the task's exit status is
//! the worker's (0 ok, 3 out of memory, 1 failed).

use std::path::Path;

use crate::profile::SlurmSection;

/// One task of a submission: the queue entry id (the file name) and the worker's argv
/// (`train ... --json`, without the program).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptTask {
    pub entry: String,
    pub argv: Vec<String>,
}

/// Quotes `s` for bash (single quotes; `'` as `'\''`), bare when it is only safe characters.
pub fn sh_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+%@".contains(&b));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `--array=0-(n-1)`, with `%N` when `array_parallelism` is set.
pub fn array_spec(n: usize, parallelism: Option<u32>) -> String {
    let last = n.saturating_sub(1);
    let range = if last == 0 {
        "0".to_string()
    } else {
        format!("0-{last}")
    };
    match parallelism {
        Some(p) => format!("{range}%{p}"),
        None => range,
    }
}

/// The `#SBATCH` options of a submission from `[slurm]` (partition, gres, time, account,
/// qos: absent keys are left to the cluster), the array and the output files.
pub fn sbatch_options(s: &SlurmSection, job_name: &str, dir: &Path, n: usize) -> Vec<String> {
    let mut o = vec![
        format!("--job-name={job_name}"),
        format!("--array={}", array_spec(n, s.array_parallelism)),
        "--ntasks=1".to_string(),
        format!("--chdir={}", dir.display()),
        format!("--output={}/slurm-%A_%a.out", dir.display()),
    ];
    if let Some(p) = &s.partition {
        o.push(format!("--partition={p}"));
    }
    if !s.gres.trim().is_empty() {
        o.push(format!("--gres={}", s.gres.trim()));
    }
    for (flag, v) in [("time", &s.time), ("account", &s.account), ("qos", &s.qos)] {
        if let Some(v) = v {
            o.push(format!("--{flag}={v}"));
        }
    }
    o
}

/// The batch script: `#SBATCH` lines from [`sbatch_options`], then a `case` over
/// `SLURM_ARRAY_TASK_ID` choosing the point, then the worker.
pub fn batch_script(
    sweep_id: i64,
    sweep_name: &str,
    s: &SlurmSection,
    dir: &Path,
    worker: &Path,
    tasks: &[ScriptTask],
) -> String {
    let mut out = String::from("#!/bin/bash\n");
    out.push_str(&format!(
        "# lorascope sweep {sweep_id} ({}): one array task per point. Generated; do not edit.\n",
        sweep_name.replace('\n', " ")
    ));
    for o in sbatch_options(s, &format!("lorascope-{sweep_id}"), dir, tasks.len()) {
        out.push_str(&format!("#SBATCH {o}\n"));
    }
    out.push_str(&format!("dir={}\n", sh_quote(&dir.display().to_string())));
    out.push_str("case \"${SLURM_ARRAY_TASK_ID:-}\" in\n");
    for (i, t) in tasks.iter().enumerate() {
        let argv: Vec<String> = t.argv.iter().map(|a| sh_quote(a)).collect();
        out.push_str(&format!(
            "  {i}) entry={}; set -- {} --telemetry ;;\n",
            sh_quote(&t.entry),
            argv.join(" ")
        ));
    }
    out.push_str(
        "  *) echo \"lorascope: array task '${SLURM_ARRAY_TASK_ID:-}' is not in this submission\" >&2; exit 1 ;;\nesac\n",
    );
    out.push_str(&format!(
        "exec {} \"$@\" >>\"$dir/$entry.jsonl\" 2>>\"$dir/$entry.err\"\n",
        sh_quote(&worker.display().to_string())
    ));
    out
}

/// The `sbatch` argv (without the program) of a script: `--parsable`, the profile's
/// `extra_args` verbatim (after the script's `#SBATCH` lines, so they win), the script.
pub fn sbatch_argv(s: &SlurmSection, script: &Path) -> Vec<String> {
    let mut a = vec!["--parsable".to_string()];
    a.extend(s.extra_args.iter().cloned());
    a.push(script.display().to_string());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("--seq-len"), "--seq-len");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn arrays() {
        assert_eq!(array_spec(4, Some(2)), "0-3%2");
        assert_eq!(array_spec(1, None), "0");
        assert_eq!(array_spec(68, None), "0-67");
    }

    #[test]
    fn the_generated_script() {
        let s = SlurmSection {
            partition: Some("gpu".into()),
            time: Some("01:00:00".into()),
            account: Some("lab".into()),
            array_parallelism: Some(2),
            extra_args: vec!["--mem=16G".into()],
            ..SlurmSection::default()
        };
        let tasks = vec![
            ScriptTask {
                entry: "3f2a9c01b2d4".into(),
                argv: [
                    "train",
                    "--model",
                    "tiny",
                    "--data",
                    "/data/my set.jsonl",
                    "--batch-size",
                    "1",
                    "--device",
                    "cuda:0",
                    "--json",
                ]
                .map(String::from)
                .to_vec(),
            },
            ScriptTask {
                entry: "9e01aa3c77f0".into(),
                argv: vec![
                    "train".into(),
                    "--batch-size".into(),
                    "2".into(),
                    "--json".into(),
                ],
            },
        ];
        let dir = Path::new("/shared/lorascope-slurm/7");
        let text = batch_script(
            7,
            "h200-grid",
            &s,
            dir,
            Path::new("/opt/lorascope/bin/lorascope"),
            &tasks,
        );
        insta::assert_snapshot!(text);
        assert_eq!(
            sbatch_argv(&s, &dir.join("submit-1.sh")),
            [
                "--parsable",
                "--mem=16G",
                "/shared/lorascope-slurm/7/submit-1.sh"
            ]
        );
    }
}
