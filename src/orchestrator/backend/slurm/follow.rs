//! Reading a task's files while it runs: `<entry>.jsonl` (the worker's JSON lines, its own
//! telemetry included) and `<entry>.err` (its stderr). The worker appends whole lines; a
//! reader may see a line half-written, so only complete lines (ending in `\n`) are taken and
//! the rest is read again at the next poll.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::spec::wire::{StepRecord, TelemetrySample};
use crate::summary::{WorkerLine, parse_worker_line};

/// What one file has given so far.
#[derive(Debug, Clone, Default)]
pub struct Tail {
    pub path: PathBuf,
    /// Bytes of complete lines consumed.
    pub offset: u64,
    pub header: Option<Value>,
    pub summary: Option<Value>,
    pub steps: Vec<StepRecord>,
    pub samples: Vec<TelemetrySample>,
    /// The latest `t` of any line (the worker's clock, seconds since it started).
    pub last_t: f64,
}

/// New records of one read, for live events.
#[derive(Debug, Clone, Default)]
pub struct NewLines {
    pub steps: Vec<StepRecord>,
    pub samples: Vec<TelemetrySample>,
    pub warnings: Vec<String>,
}

impl Tail {
    /// A tail of `path` from its start.
    pub fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            ..Tail::default()
        }
    }

    /// Reads the complete lines appended since the last call. A missing file is no lines (the
    /// task has not started); other errors are returned.
    pub fn read_new(&mut self) -> std::io::Result<NewLines> {
        let mut new = NewLines::default();
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(new),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(new);
        };
        self.offset += end as u64 + 1;
        for raw in buf[..end].split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(raw);
            if line.trim().is_empty() {
                continue;
            }
            match parse_worker_line(&line) {
                WorkerLine::Step(s) => {
                    self.last_t = self.last_t.max(s.t);
                    self.steps.push(s.clone());
                    new.steps.push(s);
                }
                WorkerLine::Telemetry(s) => {
                    self.last_t = self.last_t.max(s.t);
                    self.samples.push(s.clone());
                    new.samples.push(s);
                }
                WorkerLine::Header(v) => self.header = Some(v),
                WorkerLine::Summary(v) => self.summary = Some(v),
                // Phases are shown for local runs only.
                WorkerLine::Other(_) | WorkerLine::Phase(_) => {}
                WorkerLine::Warning(w) => new.warnings.push(w),
            }
        }
        Ok(new)
    }
}

/// From a worker's stderr file: the cause of a failure (the last `error:` line, else the last
/// non-empty line) and its telemetry note (`lorascope train: telemetry: ...`). Missing file:
/// nothing.
pub fn stderr_facts(path: &Path) -> (Option<String>, Option<String>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (None, None);
    };
    let mut last = None;
    let mut last_error = None;
    let mut note = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(n) = line.strip_prefix("lorascope train: telemetry: ") {
            note = Some(n.to_string());
            continue;
        }
        if line.starts_with("note: run with `RUST_BACKTRACE") {
            continue;
        }
        if line.contains("error:") {
            last_error = Some(line.to_string());
        }
        last = Some(line.to_string());
    }
    (last_error.or(last), note)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn only_complete_lines_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut t = Tail::new(p.clone());
        assert!(t.read_new().unwrap().steps.is_empty());
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"{\"type\":\"header\",\"model\":\"tiny\"}\n{\"type\":\"step\",\"step\":1,\"tokens\":8,\"step_seconds\":0.1,\"t\":0.5}\n{\"type\":\"telemetry\",\"t\":0.6,\"rss")
            .unwrap();
        f.flush().unwrap();
        let n = t.read_new().unwrap();
        assert_eq!((n.steps.len(), n.samples.len()), (1, 0));
        assert!(t.header.is_some());
        f.write_all(b"_bytes\":1024}\n").unwrap();
        f.flush().unwrap();
        let n = t.read_new().unwrap();
        assert_eq!(n.samples[0].rss_bytes, Some(1024));
        assert_eq!(t.last_t, 0.6);
        assert!(t.read_new().unwrap().samples.is_empty());
        assert_eq!((t.steps.len(), t.samples.len()), (1, 1));
    }

    #[test]
    fn cause_and_note_from_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.err");
        std::fs::write(
            &p,
            "lorascope train: telemetry: NVML unavailable: x\nlorascope train: error: bad data\nmore\n",
        )
        .unwrap();
        let (cause, note) = stderr_facts(&p);
        assert_eq!(cause.as_deref(), Some("lorascope train: error: bad data"));
        assert_eq!(note.as_deref(), Some("NVML unavailable: x"));
        assert_eq!(stderr_facts(&dir.path().join("none")), (None, None));
    }
}
