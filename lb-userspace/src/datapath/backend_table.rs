//! The backend arrays (`XLB_BACKENDS`, `XLB_BACKENDS6`): indexed by backend id, a free id's
//! slot all zeros (service id 0, which no service has). Point reads and writes go through
//! the map; whole-table scans (agent start, GC, `xlb inspect`) read it as memory (the maps
//! are mmapable), one copy instead of a system call per slot.
use std::{num::NonZeroUsize, os::fd::AsFd};

use aya::maps::{Array, IterableMap, MapData, MapError};
use lb_common::{Backend, MapAddr};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// The backend with `id`, if the slot holds one.
pub fn get<A: MapAddr>(map: &Array<MapData, Backend<A>>, id: u32) -> Option<Backend<A>> {
    map.get(&id, 0).ok().filter(in_use)
}

/// Writes `backend` into its id's slot.
pub fn set<A: MapAddr>(
    map: &mut Array<MapData, Backend<A>>,
    id: u32,
    backend: &Backend<A>,
) -> Result<(), MapError> {
    map.set(id, backend, 0)
}

/// Frees `id`'s slot.
pub fn clear<A: MapAddr>(map: &mut Array<MapData, Backend<A>>, id: u32) -> Result<(), MapError> {
    map.set(id, Backend::<A>::default(), 0)
}

/// Every slot in use, in id order.
pub fn scan<A: MapAddr>(
    map: &Array<MapData, Backend<A>>,
) -> std::io::Result<Vec<(u32, Backend<A>)>> {
    let slots = map.len() as usize;
    // The kernel lays array values out at 8-byte strides.
    let stride = size_of::<Backend<A>>().next_multiple_of(8);
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let len = NonZeroUsize::new((slots * stride).next_multiple_of(page))
        .ok_or_else(|| std::io::Error::other("backend map has no slots"))?;
    let fd = map.map().fd().as_fd();
    // SAFETY: a fresh read-only shared mapping of the map's values, unmapped below; nothing
    // else aliases it in this process.
    let base = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, fd, 0) }?;
    let used = (0..slots)
        .filter_map(|i| {
            // SAFETY: slot `i` lies inside the mapping; values may be unaligned for `A`.
            let b = unsafe {
                base.as_ptr()
                    .cast::<u8>()
                    .add(i * stride)
                    .cast::<Backend<A>>()
                    .read_unaligned()
            };
            in_use(&b).then_some((i as u32, b))
        })
        .collect();
    // SAFETY: the mapping made above, no longer read.
    unsafe { munmap(base, len.get()) }?;
    Ok(used)
}

fn in_use<A: MapAddr>(b: &Backend<A>) -> bool {
    b.service_id != 0
}
