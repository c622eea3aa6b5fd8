//! The arrays indexed by backend id: the backends (`XLB_BACKENDS`, `XLB_BACKENDS6`; a free
//! id's slot all zeros, service id 0, which no service has) and their open flows
//! (`XLB_CONNS`); and the reverse entries' claims (`XLB_REPLY_CLAIMS`/`6`), indexed by a
//! hash.
//! Point reads and writes go through the map; whole-table scans (agent start, GC, `xlb
//! inspect`) read it as memory (the maps are mmapable), one copy instead of a system call
//! per slot.
use std::{borrow::Borrow, num::NonZeroUsize, os::fd::AsFd};

use aya::{
    Pod,
    maps::{Array, IterableMap, MapData, MapError},
};
use lb_common::{Backend, MapAddr, ReplyClaim};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// The backend with `id`, if the slot holds one.
pub fn get<A: MapAddr>(map: &Array<MapData, Backend<A>>, id: u32) -> Option<Backend<A>> {
    map.get(&id, 0).ok().filter(in_use)
}

// An array update copies the value in place while programs may read it (a hash map swaps in
// a new element instead), so a reader can see a mix of the old and new bytes. Writes go in
// two steps that keep every mix harmless: the slot's service id, the one field a reader
// trusts the rest by, is 0 on one side of each step, or the other fields are the same on
// both sides.

/// Writes `backend` into its id's slot, which is free (ids are handed out only after their
/// slot was cleared): first without its service id, so a read in between refuses it.
pub fn set<A: MapAddr>(
    map: &mut Array<MapData, Backend<A>>,
    id: u32,
    backend: &Backend<A>,
) -> Result<(), MapError> {
    map.set(id, unclaimed(backend), 0)?;
    map.set(id, backend, 0)
}

/// Frees `id`'s slot: its service id goes first, so no read takes half-cleared fields for a
/// backend.
pub fn clear<A: MapAddr>(map: &mut Array<MapData, Backend<A>>, id: u32) -> Result<(), MapError> {
    if let Ok(held) = map.get(&id, 0) {
        map.set(id, unclaimed(&held), 0)?;
    }
    map.set(id, Backend::<A>::default(), 0)
}

fn unclaimed<A: MapAddr>(backend: &Backend<A>) -> Backend<A> {
    Backend {
        service_id: 0,
        ..*backend
    }
}

/// Every backend slot in use, in id order.
pub fn scan<A: MapAddr>(
    map: &Array<MapData, Backend<A>>,
) -> std::io::Result<Vec<(u32, Backend<A>)>> {
    scan_where(map, in_use)
}

/// Every backend id's open-flow count that is not zero.
pub fn open_flows<M: Borrow<MapData>>(map: &Array<M, u64>) -> std::io::Result<Vec<(u32, u64)>> {
    scan_where(map, |n| *n != 0)
}

/// Every claim a flow holds or held (expired ones are free for the next claim; the datapath
/// writes this array, and the agent's GC frees forward claims of removed backends), in slot
/// order.
pub fn reply_claims<M: Borrow<MapData>, A: MapAddr>(
    map: &Array<M, ReplyClaim<A>>,
) -> std::io::Result<Vec<ReplyClaim<A>>>
where
    ReplyClaim<A>: Pod,
{
    let held = scan_where(map, |c: &ReplyClaim<A>| {
        c.value.last_seen_ns != 0 && c.key.dport != 0
    })?;
    Ok(held.into_iter().map(|(_, claim)| claim).collect())
}

/// The slots of an mmapable array whose value `keep`s, in index order.
fn scan_where<M: Borrow<MapData>, T: Pod>(
    map: &Array<M, T>,
    keep: impl Fn(&T) -> bool,
) -> std::io::Result<Vec<(u32, T)>> {
    let slots = map.len() as usize;
    // The kernel lays array values out at 8-byte strides.
    let stride = size_of::<T>().next_multiple_of(8);
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let len = NonZeroUsize::new((slots * stride).next_multiple_of(page))
        .ok_or_else(|| std::io::Error::other("the array has no slots"))?;
    let fd = map.map().fd().as_fd();
    // SAFETY: a fresh read-only shared mapping of the map's values, unmapped below; nothing
    // else aliases it in this process.
    let base = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, fd, 0) }?;
    let kept = (0..slots)
        .filter_map(|i| {
            // SAFETY: slot `i` lies inside the mapping; read unaligned, as bytes laid out.
            let value = unsafe {
                base.as_ptr()
                    .cast::<u8>()
                    .add(i * stride)
                    .cast::<T>()
                    .read_unaligned()
            };
            keep(&value).then_some((i as u32, value))
        })
        .collect();
    // SAFETY: the mapping made above, no longer read.
    unsafe { munmap(base, len.get()) }?;
    Ok(kept)
}

fn in_use<A: MapAddr>(b: &Backend<A>) -> bool {
    b.service_id != 0
}
