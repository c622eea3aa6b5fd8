//! Map definitions. Maps are not pinned by the object: the agent pins them under `--bpffs`
//! (and reuses existing pins on restart), while tests load private, unpinned copies.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, ServiceKey, ServiceValue, TrafficCounter,
    map_sizes, outcome,
};

#[map(name = "XLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(map_sizes::SERVICES, 0);

#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(map_sizes::BACKENDS, 0);

#[map(name = "XLB_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(map_sizes::CONNTRACK, 0);

#[map(name = "XLB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(map_sizes::AFFINITY, 0);

#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(outcome::COUNT, 0);

#[map(name = "XLB_SVC_STATS")]
pub static SERVICE_STATS: PerCpuHashMap<u32, TrafficCounter> =
    PerCpuHashMap::with_max_entries(map_sizes::SERVICE_STATS, 0);

#[map(name = "XLB_BE_STATS")]
pub static BACKEND_STATS: PerCpuHashMap<u32, TrafficCounter> =
    PerCpuHashMap::with_max_entries(map_sizes::BACKEND_STATS, 0);
