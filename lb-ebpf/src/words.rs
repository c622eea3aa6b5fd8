//! Copies of plain data a 32-bit word at a time. LLVM turns a copy of 16 bytes or more (an
//! IPv6 address into a packet, a header into a per-CPU slot) into a call of `memmove`: a BPF
//! subprogram that copies byte by byte, each call also paying its return (the Safe-RET
//! thunk on the bench's AMD EPYC) and adding its frame to the calling program's 512 bytes
//! of stack.

/// `*dst = *src` for plain data of whole 32-bit words (checked when compiled). Like the
/// packet reads (`parse::packet_read`), one load and one store per word whatever the
/// alignment: the JITs the kernel runs us with need none.
///
/// # Safety
/// Both ranges are valid for `size_of::<T>()` bytes (packet data checked against its end,
/// or map values).
#[inline(always)]
pub unsafe fn copy<T: Copy>(dst: *mut T, src: *const T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(4)) };
    let (d, s) = (dst as *mut u32, src as *const u32);
    for i in 0..core::mem::size_of::<T>() / 4 {
        // SAFETY: within both (the caller's); the store volatile so that LLVM cannot turn
        // the loop back into a call.
        unsafe { d.add(i).write_volatile(core::ptr::read(s.add(i))) };
    }
}
