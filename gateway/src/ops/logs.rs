//! Log lines on stderr that can never stop the process.
//!
//! stderr is often a pipe (a log shipper, `| head`, journald's stream) whose
//! reader can go away. A write then fails with `EPIPE` (the Rust runtime
//! ignores SIGPIPE). tracing-subscriber reports a failed write with
//! `eprintln!`, which panics when stderr is the thing that failed: the
//! thread that logged (a core, the signal thread mid-drain) died with it.
//! Here every line is one `write_all` on stderr whose failure is counted
//! ([`lines_lost`], in `/metrics`) and otherwise ignored, and the
//! subscriber's own error reporting is off.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Log lines that could not be written (stderr closed or full of errors).
static LINES_LOST: AtomicU64 = AtomicU64::new(0);

/// Log lines lost so far.
pub fn lines_lost() -> u64 {
    LINES_LOST.load(Ordering::Relaxed)
}

/// Structured logs on stderr (journald keeps them under systemd): text
/// lines with `key=value` fields, or one JSON object per line.
pub fn init(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|e| {
        print_stderr(&format!("gateway: bad log_level {level:?}: {e}"));
        std::process::exit(2);
    });
    let logs = tracing_subscriber::fmt()
        .with_writer(Stderr)
        .log_internal_errors(false)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

/// One line on stderr outside the log subscriber (before it exists): a
/// failure is counted like a lost log line, never a panic as with
/// `eprintln!`.
pub fn print_stderr(line: &str) {
    let mut out = Vec::with_capacity(line.len() + 1);
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
    write_line(&out);
}

fn write_line(line: &[u8]) {
    if std::io::stderr().lock().write_all(line).is_err() {
        LINES_LOST.fetch_add(1, Ordering::Relaxed);
    }
}

/// The subscriber's writer: it formats a whole event into one buffer and
/// hands it over in one `write_all`, which arrives here as one `write` of
/// the whole line (this never writes less than it is given).
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}
