//! Logging: human lines on stderr in the foreground (level from RUST_LOG, default info), and
//! syslog datagrams (journald reads /dev/log) once daemonized. One line per event, no colours.

use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;
use std::io::Write;
use std::os::unix::net::UnixDatagram;

enum Sink {
    Stderr,
    Syslog(UnixDatagram),
    Discard,
}

struct Logger {
    sink: Mutex<Sink>,
}

static LOGGER: Logger = Logger {
    sink: Mutex::new(Sink::Stderr),
};

/// Parse RUST_LOG loosely: the last bare level word wins ("info", "imgfs=debug" -> debug).
fn level_from_env() -> LevelFilter {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    spec.split(',')
        .filter_map(|part| part.rsplit('=').next()?.trim().parse::<LevelFilter>().ok())
        .next_back()
        .unwrap_or(LevelFilter::Info)
}

pub fn init() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level_from_env());
}

/// Switch to syslog (after daemonizing). Falls back to discarding when there is no /dev/log.
pub fn to_syslog() {
    let sink = UnixDatagram::unbound()
        .and_then(|s| s.connect("/dev/log").map(|_| s))
        .map(Sink::Syslog)
        .unwrap_or(Sink::Discard);
    *LOGGER.sink.lock() = sink;
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) || !r.target().starts_with("imgfs") {
            return;
        }
        let sink = self.sink.lock();
        match &*sink {
            Sink::Stderr => {
                let _ = writeln!(std::io::stderr(), "imgfs: {}: {}", r.level(), r.args());
            }
            Sink::Syslog(sock) => {
                // facility daemon (3); severity from the level.
                let sev = match r.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
                let line = format!(
                    "<{}>imgfs[{}]: {}",
                    3 * 8 + sev,
                    std::process::id(),
                    r.args()
                );
                let _ = sock.send(line.as_bytes());
            }
            Sink::Discard => {}
        }
    }
    fn flush(&self) {}
}
