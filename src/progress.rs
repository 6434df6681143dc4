//! Progress of long jobs (create with preallocation, check, repair). A job is handed a `Progress`
//! (in `CreateOpts`) and reports `done` out of `total` units through it; the command line shows a
//! bar on stderr for it when stderr is a terminal and the job takes more than a moment. Nothing
//! global: a job with a default `Progress` reports to no one.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct Counts {
    done: AtomicU64,
    total: AtomicU64,
}

/// Where a job reports how far it is (cheap: two atomic stores). Default: nowhere.
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<Counts>>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(shown)"
        } else {
            "Progress(none)"
        })
    }
}

impl Progress {
    /// `done` out of `total` units are finished.
    pub fn update(&self, done: u64, total: u64) {
        if let Some(c) = &self.0 {
            c.total.store(total, Ordering::Relaxed);
            c.done.store(done.min(total), Ordering::Relaxed);
        }
    }
}

/// Shows a bar for `label` while alive (on a terminal, after half a second).
pub struct Bar {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bar {
    pub fn start(label: &str) -> Bar {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let (stop, label, counts) = (stop.clone(), label.to_string(), counts.clone());
            std::thread::spawn(move || render_loop(&label, &counts, &stop))
        });
        Bar {
            counts,
            stop,
            thread,
        }
    }

    /// The handle a job reports to this bar through.
    pub fn progress(&self) -> Progress {
        Progress(Some(self.counts.clone()))
    }
}

fn render_loop(label: &str, counts: &Counts, stop: &AtomicBool) {
    let mut shown = false;
    for tick in 0u64.. {
        std::thread::sleep(Duration::from_millis(100));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if tick < 5 {
            continue;
        }
        let done = counts.done.load(Ordering::Relaxed);
        let total = counts.total.load(Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_reach_the_bar_and_default_reports_nowhere() {
        Progress::default().update(1, 2);
        let bar = Bar::start("x");
        let p = bar.progress();
        p.update(7, 5);
        assert_eq!(bar.counts.done.load(Ordering::Relaxed), 5);
        assert_eq!(bar.counts.total.load(Ordering::Relaxed), 5);
    }
}
