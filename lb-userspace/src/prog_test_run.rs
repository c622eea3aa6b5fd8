//! `BPF_PROG_TEST_RUN`: runs a loaded program on a packet without a network, returning the
//! verdict and the packet as the program left it. Used by the datapath tests and benchmarks
//! (aya 0.14 has no wrapper for it).
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::programs::{ProgramFd, SchedClassifier, Xdp};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}
const _: () = assert!(size_of::<TestRunAttr>() == 80);

#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    #[error("program is not loaded: {0}")]
    NotLoaded(#[from] aya::programs::ProgramError),
    #[error("BPF_PROG_TEST_RUN failed: {0} (needs root or CAP_BPF + CAP_NET_ADMIN)")]
    Syscall(std::io::Error),
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct TestRunOutput {
    /// The program's return value (TC verdict), as the kernel reports it.
    pub retval: i32,
    /// The packet after the program ran.
    pub packet: Vec<u8>,
    /// Average run time per repetition in nanoseconds.
    pub duration_ns: u32,
}

/// Runs `prog` `repeat` times (at least once) on `packet`.
pub fn run(
    prog: &SchedClassifier,
    packet: &[u8],
    repeat: u32,
) -> Result<TestRunOutput, TestRunError> {
    run_fd(prog.fd()?, packet, repeat)
}

/// Runs the XDP program `prog` `repeat` times (at least once) on `packet`.
pub fn run_xdp(prog: &Xdp, packet: &[u8], repeat: u32) -> Result<TestRunOutput, TestRunError> {
    run_fd(prog.fd()?, packet, repeat)
}

fn run_fd(fd: &ProgramFd, packet: &[u8], repeat: u32) -> Result<TestRunOutput, TestRunError> {
    // Room for programs that grow the packet (ICMP errors are at most 70 bytes, but
    // leave generous space for future encapsulation).
    let mut out = vec![0u8; packet.len() + 512];
    let mut attr = TestRunAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: repeat.max(1),
        ..Default::default()
    };
    // SAFETY: attr points at live buffers of the sizes given; the kernel writes at most
    // data_size_out bytes into `out` and updates attr in place.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            size_of::<TestRunAttr>() as u32,
        )
    };
    if rc != 0 {
        return Err(TestRunError::Syscall(std::io::Error::last_os_error()));
    }
    out.truncate(attr.data_size_out as usize);
    Ok(TestRunOutput {
        retval: attr.retval as i32,
        packet: out,
        duration_ns: attr.duration,
    })
}
