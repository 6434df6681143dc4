//! Logging through `env_logger`: `RUST_LOG` takes module filters (`imgfs=debug,fuser=info`); the
//! default is info for imgfs and warnings for the crates below it. Lines go to stderr in the
//! foreground and, once daemonized, to syslog datagrams on /dev/log (journald reads them), one
//! datagram per record. env_logger has no syslog target and the daemon only knows it is detached
//! after the logger is set, so its output goes through a writer whose sink can be switched; a
//! syslog crate would add a dependency for the ten lines below.

use env_logger::fmt::Formatter;
use log::{Level, LevelFilter, Record};
use parking_lot::Mutex;
use std::io::Write;
use std::os::unix::net::UnixDatagram;

enum Sink {
    Stderr,
    Syslog(UnixDatagram),
    Discard,
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Stderr);

/// env_logger's output: each formatted record arrives in one `write` call.
struct SinkWriter;

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &*SINK.lock() {
            Sink::Stderr => std::io::stderr().write_all(buf)?,
            Sink::Syslog(sock) => {
                let _ = sock.send(buf);
            }
            Sink::Discard => {}
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn format_record(f: &mut Formatter, r: &Record) -> std::io::Result<()> {
    let ours = r.target() == "imgfs" || r.target().starts_with("imgfs::");
    let target = if ours {
        String::new()
    } else {
        format!("{}: ", r.target())
    };
    if matches!(&*SINK.lock(), Sink::Syslog(_)) {
        // Facility daemon (3); severity from the level.
        let sev = match r.level() {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug | Level::Trace => 7,
        };
        let pid = std::process::id();
        write!(f, "<{}>imgfs[{pid}]: {target}{}", 3 * 8 + sev, r.args())
    } else {
        writeln!(f, "imgfs: {}: {target}{}", r.level(), r.args())
    }
}

pub fn init() {
    let mut b = env_logger::Builder::new();
    b.filter_level(LevelFilter::Warn)
        .filter_module("imgfs", LevelFilter::Info);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.format(format_record)
        .target(env_logger::Target::Pipe(Box::new(SinkWriter)));
    let _ = b.try_init();
}

/// Switch to syslog (after daemonizing). Falls back to discarding when there is no /dev/log.
pub fn to_syslog() {
    let sink = UnixDatagram::unbound()
        .and_then(|s| s.connect("/dev/log").map(|_| s))
        .map(Sink::Syslog)
        .unwrap_or(Sink::Discard);
    *SINK.lock() = sink;
}
