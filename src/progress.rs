//! Progress of long jobs (check, repair, create with preallocation). Formats report how far they
//! are with `progress::update(done, total)` (cheap: two atomic stores); the command line shows a bar
//! on stderr when it is a terminal and the job takes more than a moment. Nothing is shown otherwise.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

static DONE: AtomicU64 = AtomicU64::new(0);
static TOTAL: AtomicU64 = AtomicU64::new(0);

/// Report progress of the current job: `done` out of `total` units.
pub fn update(done: u64, total: u64) {
    TOTAL.store(total, Ordering::Relaxed);
    DONE.store(done.min(total), Ordering::Relaxed);
}

/// Shows a bar for `label` while alive (on a terminal, after half a second).
pub struct Bar {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bar {
    pub fn start(label: &str) -> Bar {
        update(0, 0);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let (stop, label) = (stop.clone(), label.to_string());
            std::thread::spawn(move || render_loop(&label, &stop))
        });
        Bar { stop, thread }
    }
}

fn render_loop(label: &str, stop: &AtomicBool) {
    let mut shown = false;
    for tick in 0u64.. {
        std::thread::sleep(Duration::from_millis(100));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if tick < 5 {
            continue;
        }
        let (done, total) = (DONE.load(Ordering::Relaxed), TOTAL.load(Ordering::Relaxed));
        let line = match (done * 30).checked_div(total) {
            None => format!("{label}... {}s", tick / 10),
            Some(filled) => format!(
                "{label} [{}{}] {:>3}%",
                "#".repeat(filled as usize),
                ".".repeat(30 - filled as usize),
                done * 100 / total
            ),
        };
        let _ = write!(std::io::stderr(), "\r{line}\x1b[K");
        shown = true;
    }
    if shown {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
