//! Per-image statistics as JSON: what `imgfs stats` and the `user.imgfs.stats` xattr show.

use crate::image::Image;
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;

pub fn image_stats(name: &str, image: &Image) -> Value {
    let s = &image.stats;
    let flushes = s.flushes.load(Relaxed);
    let total_ns = s.flush_ns_total.load(Relaxed);
    let f = image.format_stats();
    json!({
        "name": name,
        "image": image.path().display().to_string(),
        "format": image.format(),
        "virtual_size": image.size(),
        "state": state(image),
        "transport": crate::fuse::transport::active(),
        "reads": s.reads.load(Relaxed),
        "writes": s.writes.load(Relaxed),
        "bytes_read": s.bytes_read.load(Relaxed),
        "bytes_written": s.bytes_written.load(Relaxed),
        "discards": s.discards.load(Relaxed),
        "flushes": flushes,
        "flush_avg_us": total_ns.checked_div(flushes).unwrap_or(0) / 1000,
        "flush_max_us": s.flush_ns_max.load(Relaxed) / 1000,
        "errors": s.errors.load(Relaxed),
        "cache_hits": f.cache.hits,
        "cache_misses": f.cache.misses,
        "cache_evictions": f.cache.evictions,
        "cache_writebacks": f.cache.writebacks,
        "clusters_allocated": f.clusters_allocated,
        "log_entries_written": f.log_entries_written,
        "log_entries_replayed": f.log_entries_replayed,
    })
}

/// "read-write", "read-only", or "degraded" (corruption found; writes refused).
pub fn state(image: &Image) -> &'static str {
    if image.is_degraded() {
        "degraded"
    } else if image.is_read_only() {
        "read-only"
    } else {
        "read-write"
    }
}
