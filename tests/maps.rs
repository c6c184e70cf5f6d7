//! Reading whole maps by batches (src/kernel/maps.rs): a hash table's batch stops short at
//! a bucket that does not fit, which libbpf-rs's batch iterator takes for the end.

use ebpf_net::kernel::maps;
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};

fn map(map_type: MapType, entries: u32) -> MapHandle {
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: size_of::<libbpf_sys::bpf_map_create_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    MapHandle::create(map_type, Some("maps_test"), 4, 8, entries, &opts).expect("creating a map (root?)")
}

#[test]
fn a_full_hash_table_is_read_whole() {
    let table = map(MapType::Hash, 20_000);
    let keys: Vec<u8> = (0u32..20_000).flat_map(u32::to_ne_bytes).collect();
    let values: Vec<u8> = (0u64..20_000).flat_map(|v| (v * 3).to_ne_bytes()).collect();
    table
        .update_batch(&keys, &values, 20_000, MapFlags::ANY, MapFlags::ANY)
        .unwrap();
    let read = maps::read_all(&table).unwrap();
    assert_eq!(read.len(), 20_000);
    let mut seen: Vec<u32> = read
        .iter()
        .map(|(key, value)| {
            let key = u32::from_ne_bytes(key.try_into().unwrap());
            assert_eq!(u64::from_ne_bytes(value.try_into().unwrap()), u64::from(key) * 3);
            key
        })
        .collect();
    seen.sort_unstable();
    assert!(seen.iter().copied().eq(0..20_000));
}

#[test]
fn an_array_is_read_whole_or_its_first_slots() {
    let array = map(MapType::Array, 50_000);
    array
        .update(&7u32.to_ne_bytes(), &9u64.to_ne_bytes(), MapFlags::ANY)
        .unwrap();
    let read = maps::read_all(&array).unwrap();
    assert_eq!(read.len(), 50_000);
    assert_eq!(read.iter().nth(7).unwrap().1, 9u64.to_ne_bytes());
    assert_eq!(maps::read_first(&array, 10).unwrap().len(), 10);
    let empty = map(MapType::Hash, 16);
    assert!(maps::read_all(&empty).unwrap().is_empty());
}
