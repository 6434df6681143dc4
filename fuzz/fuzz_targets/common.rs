// Shared by every target: the input is a whole image file. Open it read-only from memory (log replay
// and dirty-image repair happen in memory too), then read the first, last and a few middle ranges.
use imgfs::host::FaultFile;
use imgfs::image::{Image, OpenOpts};
use std::path::Path;

pub fn open_and_read(format: &str, data: &[u8]) {
    let file = FaultFile::new(data.to_vec());
    let opts = OpenOpts {
        format: Some(format.to_string()),
        read_only: true,
        lock: false,
        cache_size: 64 << 10,
        ..OpenOpts::default()
    };
    // Backing files named by the input are looked up beside this (nonexistent) path.
    let host = file.host_file(Path::new("/nonexistent/fuzz/image"), false);
    let Ok(img) = Image::open_host(host, &opts) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 128 << 10];
    for frac in [0u64, 1, 2, 3, 5, 7, 8] {
        let n = (buf.len() as u64).min(size);
        let off = (size - n) / 8 * frac;
        let _ = img.read_at(&mut buf[..n as usize], off);
    }
    let _ = img.seek_data(0);
}
