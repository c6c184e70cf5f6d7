//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), for xdp-lb: a lookup table of a
//! prime size in which every backend owns an almost equal share of entries, and removing or
//! adding one backend moves few entries of the others.

use std::net::SocketAddr;

/// The smallest prime of at least `min`.
pub fn prime_at_least(min: u32) -> u32 {
    let is_prime = |n: u32| n >= 2 && (2..).take_while(|d: &u32| d * d <= n).all(|d| n % d != 0);
    (min.max(2)..).find(|&n| is_prime(n)).expect("a prime exists")
}

/// The table size for `backends` backends: about 100 entries per backend (Maglev's
/// recommendation for a balanced, stable table), a prime, at most 65,537.
pub fn table_size(backends: usize) -> u32 {
    prime_at_least((backends as u32).saturating_mul(100).clamp(101, 65_537))
}

/// FNV-1a over a backend's address and port, with a seed: two independent hashes per
/// backend give its offset and skip through the table.
fn hash(backend: &SocketAddr, seed: u64) -> u64 {
    let mut bytes = match backend.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    bytes.extend_from_slice(&backend.port().to_be_bytes());
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // finalise so neighbouring addresses spread (splitmix64)
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The lookup table of `size` (a prime) entries, each the index of a backend in `backends`.
/// Depends only on the backends' addresses, not their order.
pub fn table(backends: &[SocketAddr], size: u32) -> Vec<u32> {
    weighted_table(backends, &vec![1; backends.len()], size)
}

/// [`table`] with weights: in each round every backend earns its weight and claims an entry
/// for each largest weight it has earned, so its share of entries follows its weight; a
/// weight of 0 claims none. Equal weights give [`table`]'s entries.
pub fn weighted_table(backends: &[SocketAddr], weights: &[u32], size: u32) -> Vec<u32> {
    assert_eq!(backends.len(), weights.len());
    let most = weights.iter().copied().max().unwrap_or(0);
    assert!(most > 0, "a Maglev table needs a backend with a weight");
    let size = size as u64;
    // each backend walks its own permutation of the table: offset + j * skip (mod size)
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    let walks: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let offset = hash(&backends[i], 0x5eed_0001) % size;
            let skip = hash(&backends[i], 0x5eed_0002) % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut credit = vec![0u64; order.len()];
    let mut entries = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (turn, &backend) in order.iter().enumerate() {
            credit[turn] += u64::from(weights[backend]);
            while credit[turn] >= u64::from(most) {
                credit[turn] -= u64::from(most);
                let (offset, skip) = walks[turn];
                let mut slot = (offset + next[turn] * skip) % size;
                while entries[slot as usize] != u32::MAX {
                    next[turn] += 1;
                    slot = (offset + next[turn] * skip) % size;
                }
                entries[slot as usize] = backend as u32;
                next[turn] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| format!("10.20.{}.{}:8080", i / 250, i % 250 + 2).parse().unwrap())
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &entry in table {
            counts[entry as usize] += 1;
        }
        counts
    }

    #[test]
    fn sizes_are_primes_with_room_per_backend() {
        assert_eq!(prime_at_least(100), 101);
        assert_eq!(table_size(1), 101);
        assert_eq!(table_size(3), 307);
        assert_eq!(table_size(1000), 65_537);
    }

    #[test]
    fn every_entry_is_filled_and_shares_are_nearly_equal() {
        for n in [1, 2, 3, 7, 50] {
            let size = table_size(n);
            let table = table(&backends(n), size);
            assert!(table.iter().all(|&entry| (entry as usize) < n));
            let counts = shares(&table, n);
            let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
            assert!(max - min <= 1 + max / 50, "{n} backends: shares {counts:?}");
        }
    }

    #[test]
    fn the_order_of_backends_does_not_matter() {
        let list = backends(5);
        let mut reversed = list.clone();
        reversed.reverse();
        let a: Vec<SocketAddr> = table(&list, 503).iter().map(|&i| list[i as usize]).collect();
        let b: Vec<SocketAddr> = table(&reversed, 503)
            .iter()
            .map(|&i| reversed[i as usize])
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn removing_a_backend_moves_few_entries_of_the_others() {
        let list = backends(10);
        let size = table_size(10);
        let before: Vec<SocketAddr> = table(&list, size).iter().map(|&i| list[i as usize]).collect();
        let fewer: Vec<SocketAddr> = list.iter().copied().filter(|b| *b != list[3]).collect();
        let after: Vec<SocketAddr> = table(&fewer, size).iter().map(|&i| fewer[i as usize]).collect();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(old, new)| **old != list[3] && old != new)
            .count();
        // entries of the removed backend must move; of the rest only a few percent may
        assert!(
            moved * 100 / size as usize <= 5,
            "{moved} of {size} entries of remaining backends moved"
        );
    }
}
