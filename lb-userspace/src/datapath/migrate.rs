//! Pins of an earlier layout that the agent converts instead of refusing them
//! (`pins::check_pinned_layouts`), so an upgrade keeps established flows.
//!
//! Backends:
//! `XLB_BACKENDS` and `XLB_BACKENDS6` were hash maps (backend id → backend, 1 048 576
//! entries, not preallocated) and are arrays indexed by id now. Conntrack entries name their
//! backend by id, so the ids must survive: the old map's entries are copied into the new
//! array before any program that reads it runs. The old pin is first moved aside (renamed
//! with `OLD_SUFFIX`) and removed only once its entries are in the new array: an upgrade that
//! fails in between finds it there on the next start and copies from it again.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapType},
};
use lb_common::{Backend, Ip6, MapAddr, map_names, map_sizes};

use super::{DatapathError, error_chain, pins::PinLayout};

/// `XLB_CONNS` (open flows per backend id) was an LRU hash map and is an array now. Its
/// counts are recounted from conntrack by every garbage collection, so the old pin is only
/// removed: until the first collection after the upgrade, least-conn sees no open flows.
pub fn drop_old_counts(pins: &PinLayout) -> Result<(), DatapathError> {
    let path = pins.map(map_names::CONNECTIONS);
    if path.exists() && pinned_as(&path, MapType::LruHash, 8, map_sizes::CONNECTIONS)? {
        std::fs::remove_file(&path).map_err(|e| DatapathError::PinnedMap {
            path: path.clone(),
            message: format!("removing the old open-flow counts: {e}"),
        })?;
        log::info!(
            "{}: the old LRU map replaced by an array (recounted at the next GC)",
            map_names::CONNECTIONS
        );
    }
    Ok(())
}

/// Appended to the name of a pin being migrated (bpffs names cannot contain '.').
const OLD_SUFFIX: &str = "_HASH_OLD";

/// Backends read from the old hash maps, to be written into the new arrays.
#[derive(Default)]
pub struct OldBackends {
    v4: Option<Taken<u32>>,
    v6: Option<Taken<Ip6>>,
}

struct Taken<A: MapAddr> {
    /// Where the old map is pinned now (moved aside).
    aside: PathBuf,
    entries: Vec<(u32, Backend<A>)>,
}

/// Moves old-layout backend pins aside and reads them. Pins of the current layout (or none)
/// are left alone; anything else is for the layout check to refuse.
pub fn take_old_backends(pins: &PinLayout) -> Result<OldBackends, DatapathError> {
    Ok(OldBackends {
        v4: take::<u32>(pins, map_names::BACKENDS)?,
        v6: take::<Ip6>(pins, map_names::BACKENDS6)?,
    })
}

/// Writes what `take_old_backends` read into the loaded object's (pinned) arrays, then
/// removes the old pins.
pub fn restore(ebpf: &mut Ebpf, old: OldBackends) -> Result<(), DatapathError> {
    if let Some(taken) = old.v4 {
        restore_family(ebpf, map_names::BACKENDS, taken)?;
    }
    if let Some(taken) = old.v6 {
        restore_family(ebpf, map_names::BACKENDS6, taken)?;
    }
    Ok(())
}

fn take<A: MapAddr>(
    pins: &PinLayout,
    name: &'static str,
) -> Result<Option<Taken<A>>, DatapathError> {
    let path = pins.map(name);
    let aside = aside_path(&path);
    // A migration that did not finish left the old map aside: it is still the source.
    if !aside.exists() {
        let value = size_of::<Backend<A>>();
        if !path.exists() || !pinned_as(&path, MapType::Hash, value, OLD_CAPACITY)? {
            return Ok(None);
        }
        std::fs::rename(&path, &aside).map_err(|e| DatapathError::PinnedMap {
            path: path.clone(),
            message: format!("moving it aside to {} for migration: {e}", aside.display()),
        })?;
        log::info!(
            "{name}: converting the pinned hash map of an earlier xlb into an array (ids kept)"
        );
    }
    let data = MapData::from_pin(&aside).map_err(|e| pinned_err(&aside, &e))?;
    let old: HashMap<_, u32, Backend<A>> =
        HashMap::try_from(Map::HashMap(data)).map_err(|e| pinned_err(&aside, &e))?;
    let mut entries = Vec::new();
    for item in old.iter() {
        let (id, backend) = item.map_err(|e| pinned_err(&aside, &e))?;
        // The old agents handed out ids below the counter arrays' capacity, which is the
        // array's: nothing is dropped here in practice.
        if id < map_sizes::BACKENDS {
            entries.push((id, backend));
        } else {
            log::warn!("{name}: backend id {id} does not fit the new array; dropped");
        }
    }
    Ok(Some(Taken { aside, entries }))
}

fn restore_family<A: MapAddr>(
    ebpf: &mut Ebpf,
    name: &'static str,
    taken: Taken<A>,
) -> Result<(), DatapathError> {
    let map_err = |e: &dyn std::error::Error| DatapathError::Map {
        name,
        message: error_chain(e),
    };
    let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
    let mut array: Array<_, Backend<A>> = Array::try_from(map).map_err(|e| map_err(&e))?;
    for (id, backend) in &taken.entries {
        array.set(*id, backend, 0).map_err(|e| map_err(&e))?;
    }
    std::fs::remove_file(&taken.aside).map_err(|e| DatapathError::PinnedMap {
        path: taken.aside.clone(),
        message: format!("removing it after its migration: {e}"),
    })?;
    log::info!("{name}: {} backend(s) migrated", taken.entries.len());
    Ok(())
}

/// Whether the map pinned at `path` is an earlier layout's: of `map_type`, keyed by a u32
/// id, with `value`-byte values and `capacity` entries.
fn pinned_as(
    path: &Path,
    map_type: MapType,
    value: usize,
    capacity: u32,
) -> Result<bool, DatapathError> {
    let info = MapData::from_pin(path)
        .and_then(|m| m.info())
        .map_err(|e| pinned_err(path, &e))?;
    Ok(info.map_type().is_ok_and(|t| t == map_type)
        && info.key_size() == 4
        && info.value_size() as usize == value
        && info.max_entries() == capacity)
}

/// `map_sizes::BACKENDS` of the hash-map layout the last release pinned.
const OLD_CAPACITY: u32 = 1_048_576;

/// Where `take_old_backends` moves old pins (for `xlb cleanup`).
pub fn aside_pins(pins: &PinLayout) -> [PathBuf; 2] {
    [map_names::BACKENDS, map_names::BACKENDS6].map(|name| aside_path(&pins.map(name)))
}

fn aside_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(OLD_SUFFIX);
    path.with_file_name(name)
}

fn pinned_err(path: &Path, e: &dyn std::error::Error) -> DatapathError {
    DatapathError::PinnedMap {
        path: path.to_path_buf(),
        message: error_chain(e),
    }
}
