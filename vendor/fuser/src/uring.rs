//! imgfs addition: the FUSE-over-io_uring transport (Linux 6.14+, module parameter
//! `fuse.enable_uring`).
//!
//! After FUSE_INIT negotiated `FUSE_OVER_IO_URING`, every kernel queue (one per possible CPU)
//! gets ring entries, registered with `IORING_OP_URING_CMD` (128-byte SQEs) on the device fd:
//! per entry a header buffer (`fuse_uring_req_header`) and a payload buffer. The command
//! completes when the kernel has put a request into the entry; the request then goes through
//! the same dispatch as one read from `/dev/fuse`, its reply is written into the same buffers,
//! and `COMMIT_AND_FETCH` hands the entry back, which also waits for the next request.
//!
//! The kernel keeps sending forgets and interrupts (and anything queued before every queue
//! had an entry) through `/dev/fuse` reads, so one classic reader runs next to the rings.
//!
//! Entry memory (one allocation, page aligned):
//!
//! ```text
//!   0      fuse_uring_req_header: in_out[128] | op_in[128] | fuse_uring_ent_in_out (32)
//!   ...    the request rebuilt as /dev/fuse would deliver it: fuse_in_header + op_in, ending
//!   4096   payload (what follows op_in: names, write data; the reply after the out header)
//! ```
//!
//! Rebuilding the request right before the payload keeps write data where the kernel put it
//! (no copy) while the existing parser sees one contiguous message.

use std::alloc::Layout;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Condvar;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::channel::Channel;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `fuse_uring_cmd` values (`sqe->cmd_op`).
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// Offsets in `fuse_uring_req_header`.
const IN_OUT: usize = 0;
const OP_IN: usize = 128;
const OP_IN_SZ: usize = 128;
const ENT_COMMIT_ID: usize = 256 + 8;
const ENT_PAYLOAD_SZ: usize = 256 + 16;
/// `sizeof(struct fuse_uring_req_header)`.
const HEADER_SZ: usize = 288;
const IN_HEADER_SZ: usize = 40;
const OUT_HEADER_SZ: usize = 16;
/// Where the payload buffer starts in an entry's memory.
const PAYLOAD: usize = 4096;

fn read_u32(p: *const u8) -> u32 {
    // SAFETY: callers pass pointers inside an entry's allocation with 4 bytes to read.
    unsafe { std::ptr::read_unaligned(p.cast::<u32>()) }
}

fn read_u64(p: *const u8) -> u64 {
    // SAFETY: as read_u32, 8 bytes.
    unsafe { std::ptr::read_unaligned(p.cast::<u64>()) }
}

fn write_u32(p: *mut u8, v: u32) {
    // SAFETY: as read_u32, for writing.
    unsafe { std::ptr::write_unaligned(p.cast::<u32>(), v) }
}

/// Which CPUs the kernel makes queues for (`num_possible_cpus()`), and which are online.
fn cpu_list(name: &str) -> Vec<usize> {
    let Ok(s) = std::fs::read_to_string(format!("/sys/devices/system/cpu/{name}")) else {
        return Vec::new();
    };
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let mut ends = part.splitn(2, '-').map(|x| x.parse::<usize>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), None) => cpus.push(a),
            (Some(Ok(a)), Some(Ok(b))) if a <= b => cpus.extend(a..=b),
            _ => return Vec::new(),
        }
    }
    cpus
}

/// One reply target: the buffers of a ring entry while its request is in user space.
#[derive(Debug)]
pub(crate) struct Slot {
    mem: NonNull<u8>,
    layout: Layout,
    payload_cap: usize,
    state: Mutex<SlotState>,
    replied: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    replied: bool,
    /// The request has bytes in the payload buffer (e.g. write data) that the handler may still
    /// borrow: the reply's payload is staged and copied in after the handler returned.
    request_payload: bool,
    staged: Vec<u8>,
}

// SAFETY: the raw memory is only written by the reply (under `state`) while the ring thread
// waits for it, and by the ring thread otherwise; see `UringRing::serve`.
unsafe impl Send for Slot {}
// SAFETY: as above.
unsafe impl Sync for Slot {}

impl Slot {
    fn new(payload_cap: usize) -> io::Result<Slot> {
        let layout = Layout::from_size_align(PAYLOAD + payload_cap, 4096)
            .map_err(|_| io::Error::other("ring entry too large"))?;
        // SAFETY: the layout has a non-zero size.
        let mem = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Slot {
            mem,
            layout,
            payload_cap,
            state: Mutex::new(SlotState::default()),
            replied: Condvar::new(),
        })
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        // SAFETY: every offset used is inside the allocation.
        unsafe { self.mem.as_ptr().add(off) }
    }

    /// Write a reply given as fuser's iovec (out header first).
    pub(crate) fn send(&self, iov: &[io::IoSlice<'_>]) -> io::Result<()> {
        let mut st = self.state.lock();
        if st.replied {
            return Err(io::Error::other("second reply to one ring request"));
        }
        let header: &[u8] = iov.first().map_or(&[], |h| h);
        if header.len() != OUT_HEADER_SZ {
            return Err(io::Error::other("malformed reply header"));
        }
        let body = &iov[1..];
        let len: usize = body.iter().map(|b| b.len()).sum();
        let mut result = Ok(());
        // SAFETY: the header area is not part of any request bytes a handler borrows.
        unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), self.ptr(IN_OUT), OUT_HEADER_SZ) };
        let sent = if len > self.payload_cap {
            // Cannot happen with the negotiated sizes; fail the request rather than overflow.
            write_u32(self.ptr(IN_OUT), OUT_HEADER_SZ as u32);
            write_u32(self.ptr(IN_OUT + 4), (-libc::EIO) as u32);
            result = Err(io::Error::other(
                "reply larger than the ring payload buffer",
            ));
            0
        } else if st.request_payload {
            st.staged.clear();
            for b in body {
                st.staged.extend_from_slice(b);
            }
            len
        } else {
            let mut off = PAYLOAD;
            for b in body {
                // SAFETY: inside the payload buffer (len <= payload_cap); `copy` because a
                // reply may come from the payload buffer itself.
                unsafe { std::ptr::copy(b.as_ptr(), self.ptr(off), b.len()) };
                off += b.len();
            }
            len
        };
        write_u32(self.ptr(ENT_PAYLOAD_SZ), sent as u32);
        st.replied = true;
        self.replied.notify_one();
        result
    }

    /// The payload buffer, for a handler that builds its reply data in place. `None` while the
    /// request itself has bytes there.
    pub(crate) fn payload_buffer(&self) -> Option<&mut [u8]> {
        let st = self.state.lock();
        if st.request_payload || st.replied {
            return None;
        }
        // SAFETY: no request bytes live in the payload buffer and nothing else writes it until
        // the reply is sent; the caller (ReplyData) holds it only while it owns the reply.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr(PAYLOAD), self.payload_cap) })
    }

    /// Send `n` bytes already placed at the start of the payload buffer, for request `unique`.
    pub(crate) fn send_in_place(&self, unique: u64, n: usize) {
        let mut st = self.state.lock();
        let n = n.min(self.payload_cap);
        write_u32(self.ptr(IN_OUT), (OUT_HEADER_SZ + n) as u32);
        write_u32(self.ptr(IN_OUT + 4), 0);
        // SAFETY: 8 bytes inside the header area.
        unsafe { std::ptr::write_unaligned(self.ptr(IN_OUT + 8).cast::<u64>(), unique) };
        write_u32(self.ptr(ENT_PAYLOAD_SZ), n as u32);
        st.replied = true;
        self.replied.notify_one();
    }

    /// Ring thread: wait until the handler replied (at once for handlers that reply before
    /// returning), then move a staged reply into the payload buffer.
    fn finish(&self) {
        let mut st = self.state.lock();
        while !st.replied {
            self.replied.wait(&mut st);
        }
        if !st.staged.is_empty() {
            // SAFETY: the handler has returned; the request bytes are no longer borrowed.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    st.staged.as_ptr(),
                    self.ptr(PAYLOAD),
                    st.staged.len(),
                )
            };
            st.staged.clear();
        }
        st.replied = false;
        st.request_payload = false;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: allocated in `Slot::new` with this layout.
        unsafe { std::alloc::dealloc(self.mem.as_ptr(), self.layout) };
    }
}

/// What a reply to a ring request is sent through.
#[derive(Debug, Clone)]
pub(crate) struct UringReply {
    pub(crate) slot: Arc<Slot>,
    /// The device, for passthrough backing ids.
    pub(crate) dev: ChannelSender,
}

/// One ring entry: its buffers and the iovec registered for them.
struct Entry {
    slot: Arc<Slot>,
    qid: u16,
    iov: Box<[libc::iovec; 2]>,
    /// Command to resubmit after EAGAIN/EINTR.
    last_cmd: u32,
    commit_id: u64,
    live: bool,
}

/// One ring thread's io_uring instance and the queues it serves, made before FUSE_INIT is
/// answered so that a kernel or sandbox without io_uring is found before it is negotiated.
pub(crate) struct UringRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    qids: Vec<u16>,
    cpu: Option<usize>,
}

impl std::fmt::Debug for UringRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringRing")
            .field("qids", &self.qids)
            .field("cpu", &self.cpu)
            .finish()
    }
}

/// The ring threads to start once FUSE_INIT is answered.
#[derive(Debug)]
pub(crate) struct UringPool {
    pub(crate) rings: Vec<UringRing>,
    pub(crate) payload_size: usize,
}

impl UringPool {
    /// At least `threads` rings (at least one per online CPU), together serving every possible
    /// CPU's queue; each online CPU's queue is served by threads pinned to that CPU.
    pub(crate) fn new(threads: usize, payload_size: usize) -> io::Result<UringPool> {
        let possible = cpu_list("possible");
        let nr_queues = possible.iter().max().map_or(0, |m| m + 1);
        if nr_queues == 0 || nr_queues > u16::MAX as usize {
            return Err(io::Error::other(
                "cannot read /sys/devices/system/cpu/possible",
            ));
        }
        let mut online: Vec<usize> = cpu_list("online")
            .into_iter()
            .filter(|c| *c < nr_queues)
            .collect();
        if online.is_empty() {
            online = (0..nr_queues).collect();
        }
        let n = threads.max(online.len());
        let mut qids: Vec<Vec<u16>> = (0..n)
            .map(|i| vec![online[i % online.len()] as u16])
            .collect();
        // Queues of CPUs that are not online never get requests but must have an entry
        // before the kernel uses the rings.
        for q in 0..nr_queues {
            if !online.contains(&q) {
                qids[0].push(q as u16);
            }
        }
        let mut rings = Vec::with_capacity(n);
        for (i, qids) in qids.into_iter().enumerate() {
            let entries = (qids.len() as u32).next_power_of_two();
            let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
                .setup_cqsize(entries * 2)
                .build(entries)?;
            let cpu = Some(online[i % online.len()]);
            rings.push(UringRing { ring, qids, cpu });
        }
        Ok(UringPool {
            rings,
            payload_size,
        })
    }
}

fn command(
    dev: RawFd,
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    iov: Option<&[libc::iovec; 2]>,
    user_data: u64,
) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut op = opcode::UringCmd80::new(types::Fd(dev), cmd_op).cmd(cmd);
    if let Some(iov) = iov {
        op = op.addr(Some(iov.as_ptr() as u64));
    }
    let sqe = op.build().user_data(user_data);
    let Some(iov) = iov else {
        return sqe;
    };
    // REGISTER also needs `sqe->len` = 2 (header and payload iovecs), which the io-uring crate's
    // builder does not set: patch the field (offset 24 of the 128-byte SQE) in place.
    const _: () = assert!(size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is a repr(C) 128-byte SQE (asserted above); bytes 24..28 are `len`.
    unsafe {
        let mut raw: [u8; 128] = std::mem::transmute(sqe);
        raw[24..28].copy_from_slice(&(iov.len() as u32).to_ne_bytes());
        std::mem::transmute::<[u8; 128], squeue::Entry128>(raw)
    }
}

impl UringRing {
    /// Register this thread's entries and serve requests until the connection ends.
    pub(crate) fn serve<FS: Filesystem>(
        mut self,
        se: &SessionEventLoop<FS>,
        ch: &Channel,
        payload_size: usize,
    ) -> io::Result<()> {
        if let Some(cpu) = self.cpu {
            pin_to_cpu(cpu);
        }
        let dev = ch.as_fd().as_raw_fd();
        let mut entries = Vec::with_capacity(self.qids.len());
        for &qid in &self.qids {
            let slot = Arc::new(Slot::new(payload_size)?);
            let iov = Box::new([
                libc::iovec {
                    iov_base: slot.ptr(0).cast(),
                    iov_len: HEADER_SZ,
                },
                libc::iovec {
                    iov_base: slot.ptr(PAYLOAD).cast(),
                    iov_len: payload_size,
                },
            ]);
            entries.push(Entry {
                slot,
                qid,
                iov,
                last_cmd: CMD_REGISTER,
                commit_id: 0,
                live: true,
            });
        }
        for (i, e) in entries.iter().enumerate() {
            let sqe = command(dev, CMD_REGISTER, e.qid, 0, Some(&e.iov), i as u64);
            // SAFETY: the iovecs and the buffers they name live in `entries`, which outlives
            // the ring (dropped after it at the end of this function).
            unsafe { self.ring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        let sender = ch.sender();
        let mut live = entries.len();
        let mut ready = Vec::with_capacity(entries.len());
        while live > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            ready.clear();
            ready.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data() as usize, c.result())),
            );
            for &(i, res) in &ready {
                let Some(e) = entries.get_mut(i) else {
                    continue;
                };
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    let iov = (e.last_cmd == CMD_REGISTER).then_some(&*e.iov);
                    let sqe = command(dev, e.last_cmd, e.qid, e.commit_id, iov, i as u64);
                    // SAFETY: as for the registration above.
                    unsafe { self.ring.submission().push(&sqe) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                    continue;
                }
                if res < 0 {
                    let err = io::Error::from_raw_os_error(-res);
                    match -res {
                        // The connection ended (unmount, abort) or the ring is being torn down.
                        libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => {
                            debug!("ring entry qid {} ends: {err}", e.qid)
                        }
                        _ => error!("ring entry qid {} failed: {err}", e.qid),
                    }
                    e.live = false;
                    live -= 1;
                    continue;
                }
                e.commit_id = read_u64(e.slot.ptr(ENT_COMMIT_ID));
                self.handle(se, &sender, e);
                let sqe = command(
                    dev,
                    CMD_COMMIT_AND_FETCH,
                    e.qid,
                    e.commit_id,
                    None,
                    i as u64,
                );
                e.last_cmd = CMD_COMMIT_AND_FETCH;
                // SAFETY: commit reads the entry's registered buffers, alive as above.
                unsafe { self.ring.submission().push(&sqe) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
        }
        debug!("ring thread for queues {:?} done", self.qids);
        // The ring goes before the buffers it names.
        drop(self.ring);
        drop(entries);
        Ok(())
    }

    /// Run one request that the kernel put in entry `e`, leaving the reply in its buffers.
    fn handle<FS: Filesystem>(&self, se: &SessionEventLoop<FS>, sender: &ChannelSender, e: &Entry) {
        let slot = &e.slot;
        let len = read_u32(slot.ptr(IN_OUT)) as usize;
        let payload_sz = read_u32(slot.ptr(ENT_PAYLOAD_SZ)) as usize;
        let op_in = len.checked_sub(IN_HEADER_SZ + payload_sz);
        let Some(op_in) = op_in.filter(|n| *n <= OP_IN_SZ && payload_sz <= slot.payload_cap) else {
            error!("ring request with inconsistent sizes (len {len}, payload {payload_sz})");
            return self.fail(slot, e.commit_id);
        };
        // Rebuild "fuse_in_header, op_in" right before the payload.
        let start = PAYLOAD - IN_HEADER_SZ - op_in;
        // SAFETY: source and destination are inside the allocation and do not overlap
        // (header area below HEADER_SZ, rebuilt message above PAYLOAD - 168).
        unsafe {
            std::ptr::copy_nonoverlapping(slot.ptr(IN_OUT), slot.ptr(start), IN_HEADER_SZ);
            std::ptr::copy_nonoverlapping(slot.ptr(OP_IN), slot.ptr(start + IN_HEADER_SZ), op_in);
        }
        slot.state.lock().request_payload = payload_sz > 0;
        let mut unaligned = Vec::new();
        let data: &[u8] = if start % 8 == 0 {
            // SAFETY: `len` bytes from `start` are the request, written above and by the
            // kernel; nothing writes them until `finish` (replies go to the header area and,
            // for requests with payload, to the staging buffer).
            unsafe { std::slice::from_raw_parts(slot.ptr(start), len) }
        } else {
            // An op header whose size is not a multiple of 8 (none today): copy to keep the
            // parser's alignment.
            let words = len.div_ceil(8);
            unaligned.resize(words, 0u64);
            // SAFETY: the vector holds at least `len` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(slot.ptr(start), unaligned.as_mut_ptr().cast(), len);
                std::slice::from_raw_parts(unaligned.as_ptr().cast(), len)
            }
        };
        let reply = UringReply {
            slot: slot.clone(),
            dev: sender.clone(),
        };
        match RequestWithSender::new(sender.clone(), data) {
            Some(req) => {
                let req = req.with_uring(reply);
                if let Ok(Operation::Destroy(_)) = req.request.operation() {
                    req.reply::<crate::ReplyEmpty>().ok();
                } else {
                    req.dispatch(se);
                }
            }
            None => {
                drop(reply);
                return self.fail(slot, e.commit_id);
            }
        }
        slot.finish();
    }

    /// Answer the entry's request with EIO.
    fn fail(&self, slot: &Slot, unique: u64) {
        let header = crate::ll::fuse_abi::fuse_out_header {
            len: OUT_HEADER_SZ as u32,
            error: -libc::EIO,
            unique,
        };
        slot.state.lock().request_payload = false;
        let bytes = zerocopy::IntoBytes::as_bytes(&header);
        if let Err(e) = slot.send(&[io::IoSlice::new(bytes)]) {
            warn!("ring request {unique}: {e}");
        }
        slot.finish();
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "cannot pin ring thread to CPU {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Run the ring threads next to the classic reader; returns their results.
pub(crate) fn spawn<FS: Filesystem>(
    pool: UringPool,
    make_loop: impl Fn(String) -> SessionEventLoop<FS>,
    ch: &Channel,
) -> io::Result<Vec<std::thread::JoinHandle<io::Result<()>>>> {
    let mut threads = Vec::with_capacity(pool.rings.len());
    let payload = pool.payload_size;
    for (i, ring) in pool.rings.into_iter().enumerate() {
        let name = format!("fuser-ring-{i}");
        let se = make_loop(name.clone());
        let ch = ch.clone();
        threads.push(
            std::thread::Builder::new()
                .name(name)
                .spawn(move || ring.serve(&se, &ch, payload))?,
        );
    }
    Ok(threads)
}
