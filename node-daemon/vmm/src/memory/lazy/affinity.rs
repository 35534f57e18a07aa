//! Pinning threads to CPUs: the fault handler next to the vCPU it serves
//! (cross-CPU wake-ups are the expensive part of a fault on some hosts).

use std::io;

/// Pins thread `tid` (0: the calling thread) to `cpu`. Threads it starts
/// afterwards inherit the affinity.
pub fn pin_thread(tid: libc::pid_t, cpu: usize) -> io::Result<()> {
    pin_thread_to(tid, [cpu])
}

/// Lets thread `tid` (0: the calling thread) run on every online CPU again.
pub fn unpin_thread(tid: libc::pid_t) -> io::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    pin_thread_to(tid, 0..cpus)
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`.
pub fn pin_thread_to(tid: libc::pid_t, cpus: impl IntoIterator<Item = usize>) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        // SAFETY: CPU_SET writes one bit of the set we own (it bounds-checks cpu).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: passes a pointer to our set and its exact size.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
