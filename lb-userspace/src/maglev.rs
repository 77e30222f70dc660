//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), with weights.
//!
//! The table depends only on the set of backends (their identity bytes and weights) and its
//! size: backends are sorted by identity first, so every machine builds the same table whatever
//! order the endpoints were listed in, and several load balancers behind ECMP agree on every
//! flow.

use std::net::IpAddr;

use lb_common::hash::bytes_hash;
use sha2::{Digest as _, Sha256};

/// Seeds of the two hashes that give a backend its offset and skip.
const OFFSET_SEED: u32 = 0x5f3c_9d21;
const SKIP_SEED: u32 = 0x2b8e_1a47;

/// One backend to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// What the table stores for this backend (the data plane's backend id).
    pub id: u32,
    /// Stable identity bytes (address and port): they alone decide the placement.
    pub identity: Vec<u8>,
    /// Relative weight; 0 takes no slots.
    pub weight: u32,
}

impl MaglevBackend {
    /// A backend at `addr`:`port`, placed by that identity (the same bytes on every node).
    pub fn at(id: u32, addr: IpAddr, port: u16, weight: u32) -> Self {
        Self {
            id,
            identity: identity(addr, port),
            weight,
        }
    }
}

/// The identity bytes of the backend at `addr`:`port`: the 16-byte address (IPv4-mapped for
/// IPv4) then the port, big-endian. They alone decide where a backend lands in a table.
pub fn identity(addr: IpAddr, port: u16) -> Vec<u8> {
    let mut identity = lb_common::maps::addr16(addr).to_vec();
    identity.extend_from_slice(&port.to_be_bytes());
    identity
}

/// A digest of `table` (backend ids, as [`build`] made it from `backends`) that names each
/// slot's backend by its identity, not its id: two nodes that build the same table for the
/// same endpoints report the same digest whatever ids they gave. `sha256:` and the first 16
/// hex digits of SHA-256 over the table size, the identities in order, and each slot's rank
/// among them.
pub fn digest(backends: &[MaglevBackend], table: &[u32]) -> String {
    let mut placed: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    placed.sort_by(|a, b| a.identity.cmp(&b.identity));
    let mut hasher = Sha256::new();
    hasher.update((table.len() as u64).to_be_bytes());
    for backend in &placed {
        hasher.update((backend.identity.len() as u32).to_be_bytes());
        hasher.update(&backend.identity);
        hasher.update(backend.weight.to_be_bytes());
    }
    let ranks: std::collections::HashMap<u32, u32> = placed
        .iter()
        .enumerate()
        .map(|(rank, b)| (b.id, rank as u32))
        .collect();
    for id in table {
        hasher.update(ranks.get(id).copied().unwrap_or(u32::MAX).to_be_bytes());
    }
    let sum = hasher.finalize();
    let hex: String = sum[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A service's table as the data plane holds it: `size` slots placing new flows over every
/// endpoint (those that take none included), then, when some take none, `size` more slots
/// placing them over those that do, for the flows whose first slot names one that does not.
/// So a backend turning not-ready or terminating moves no other backend's flows (the first
/// table stays as it was), and its own new flows spread over the others as evenly as a table
/// without it would spread them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Slots of each of the two tables (a prime).
    pub size: u32,
    /// The first table, then the fallback table when there is one.
    pub slots: Vec<u32>,
}

impl MaglevTable {
    /// A table without fallback.
    pub fn single(slots: Vec<u32>) -> Self {
        Self {
            size: slots.len() as u32,
            slots,
        }
    }

    /// The fallback table, if any.
    pub fn fallback(&self) -> Option<&[u32]> {
        self.slots
            .get(self.size as usize..)
            .filter(|f| !f.is_empty())
    }

    /// The first table.
    pub fn first(&self) -> &[u32] {
        &self.slots[..(self.size as usize).min(self.slots.len())]
    }

    /// Builds the table of `size` for `backends`, of which those with `accepting` false take
    /// no new flows: `None` when none with weight does.
    pub fn build(
        backends: &[(MaglevBackend, bool)],
        size: u32,
    ) -> Result<Option<Self>, MaglevError> {
        let accepting: Vec<MaglevBackend> = backends
            .iter()
            .filter(|(_, accepting)| *accepting)
            .map(|(b, _)| b.clone())
            .collect();
        let Some(fallback) = build(&accepting, size)? else {
            return Ok(None);
        };
        if accepting.len() == backends.len() {
            return Ok(Some(Self::single(fallback)));
        }
        let every: Vec<MaglevBackend> = backends.iter().map(|(b, _)| b.clone()).collect();
        let mut slots = build(&every, size)?.expect("a backend with weight accepts");
        slots.extend(fallback);
        Ok(Some(Self { size, slots }))
    }
}

/// Errors of table building.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The size is not a prime, so skips would not visit every slot.
    #[error("Maglev table size {0} is not a prime")]
    NotPrime(u32),
}

/// Whether `n` is a prime.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Builds a table of `size` slots (a prime). Returns `None` when no backend has weight.
pub fn build(backends: &[MaglevBackend], size: u32) -> Result<Option<Vec<u32>>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    let mut live: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return Ok(None);
    }
    live.sort_by(|a, b| a.identity.cmp(&b.identity));
    // Each backend walks its permutation offset, offset + skip, ... (mod M); walking by
    // adding and wrapping avoids a multiplication and a division per step.
    let mut position: Vec<u32> = Vec::with_capacity(live.len());
    let mut skips: Vec<u32> = Vec::with_capacity(live.len());
    for b in &live {
        position.push(bytes_hash(OFFSET_SEED, &b.identity) % size);
        skips.push(bytes_hash(SKIP_SEED, &b.identity) % (size - 1) + 1);
    }
    let advance = |pos: u32, skip: u32| {
        let next = pos + skip;
        if next >= size { next - size } else { next }
    };
    // Weights are turns per round: a backend of weight w claims w slots for every 1 a backend
    // of weight 1 claims.
    let max_weight = u64::from(live.iter().map(|b| b.weight).max().unwrap_or(1));
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    let mut round = 0u64;
    loop {
        round += 1;
        for (i, backend) in live.iter().enumerate() {
            // Spread a backend's turns over the rounds: it plays in round r when its share of r
            // turns grows past the turns it already took.
            let weight = u64::from(backend.weight);
            let turns = weight * round / max_weight - weight * (round - 1) / max_weight;
            for _ in 0..turns {
                let mut slot = position[i];
                while table[slot as usize] != u32::MAX {
                    slot = advance(slot, skips[i]);
                }
                table[slot as usize] = backend.id;
                position[i] = advance(slot, skips[i]);
                filled += 1;
                if filled == size {
                    return Ok(Some(table));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn digests_name_backends_by_identity_not_by_id() {
        let addr = |i: u8| std::net::IpAddr::from([198, 18, 1, i]);
        let on_a: Vec<MaglevBackend> = (1..=5)
            .map(|i| MaglevBackend::at(u32::from(i), addr(i), 80, 1))
            .collect();
        let on_b: Vec<MaglevBackend> = (1..=5)
            .rev()
            .map(|i| MaglevBackend::at(100 + u32::from(i) * 7, addr(i), 80, 1))
            .collect();
        let table_a = build(&on_a, 251).unwrap().unwrap();
        let table_b = build(&on_b, 251).unwrap().unwrap();
        assert_ne!(table_a, table_b, "different ids in the slots");
        assert_eq!(digest(&on_a, &table_a), digest(&on_b, &table_b));
        let fewer = &on_a[..4];
        let table = build(fewer, 251).unwrap().unwrap();
        assert_ne!(digest(fewer, &table), digest(&on_a, &table_a));
        let mut heavier = on_a.clone();
        heavier[0].weight = 2;
        let table = build(&heavier, 251).unwrap().unwrap();
        assert_ne!(digest(&heavier, &table), digest(&on_a, &table_a));
    }

    use std::collections::HashMap;

    use super::*;

    fn backends(n: u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                id: i,
                identity: format!("10.0.{}.{}:8080", i / 250, i % 250).into_bytes(),
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut shares = HashMap::new();
        for id in table {
            *shares.entry(*id).or_default() += 1;
        }
        shares
    }

    #[test]
    fn rejects_non_prime_sizes() {
        assert_eq!(build(&backends(3), 100), Err(MaglevError::NotPrime(100)));
    }

    #[test]
    fn no_weighted_backend_gives_no_table() {
        assert_eq!(build(&[], 13).unwrap(), None);
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let n = 10;
        let table = build(&backends(n), 16381).unwrap().unwrap();
        assert!(table.iter().all(|id| *id < n));
        let fair = 16381.0 / f64::from(n);
        for (id, count) in shares(&table) {
            let off = (count as f64 - fair).abs() / fair;
            assert!(off < 0.01, "backend {id}: {count} slots, fair {fair}");
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let forward = backends(7);
        let mut reversed = forward.clone();
        reversed.reverse();
        assert_eq!(build(&forward, 65537), build(&reversed, 65537));
    }

    #[test]
    fn balance_is_within_one_percent_for_many_sizes() {
        for (n, size) in [(3, 16381), (10, 16381), (100, 65537), (7, 1021)] {
            let table = build(&backends(n), size).unwrap().unwrap();
            let fair = f64::from(size) / f64::from(n);
            let shares = shares(&table);
            assert_eq!(shares.len(), n as usize);
            for (id, count) in shares {
                let off = (count as f64 - fair).abs() / fair;
                assert!(
                    off <= 0.01,
                    "N={n} M={size}: backend {id} has {count}, fair {fair:.1}"
                );
            }
        }
    }

    /// Slots whose backend changed between `before` and `after` although the backend they held
    /// is in both tables (neither removed nor the newcomer): the disruption Maglev keeps small.
    /// Counted slot by slot, not derived from other counts.
    fn survivors_moved(before: &[u32], after: &[u32], changed: u32) -> usize {
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| b != a && **b != changed && **a != changed)
            .count()
    }

    /// Removing any one of N backends empties exactly its own slots (each now held by a
    /// survivor), and moves at most 2% of the table between survivors (the paper measures
    /// about 1% here); the survivors still share the table within 1%.
    #[test]
    fn removing_one_backend_moves_its_slots_and_few_others() {
        for (n, size) in [(10, 16381), (5, 1021), (30, 65537)] {
            let all = backends(n);
            let before = build(&all, size).unwrap().unwrap();
            for removed in 0..n {
                let survivors: Vec<_> = all.iter().filter(|b| b.id != removed).cloned().collect();
                let after = build(&survivors, size).unwrap().unwrap();
                assert!(!after.contains(&removed));
                let moved = survivors_moved(&before, &after, removed);
                assert!(
                    (moved as f64) / f64::from(size) <= 0.02,
                    "N={n} M={size} without {removed}: {moved} slots of survivors moved"
                );
                let fair = f64::from(size) / f64::from(n - 1);
                for (id, count) in shares(&after) {
                    assert!(
                        (count as f64 - fair).abs() / fair <= 0.01,
                        "N={n} M={size} without {removed}: {id} has {count}, fair {fair:.1}"
                    );
                }
            }
        }
    }

    /// Adding a backend gives it its fair share, taken from the others, and moves at most 2%
    /// of the table between the backends that were there before.
    #[test]
    fn adding_one_backend_takes_a_fair_share_and_moves_few_others() {
        for (n, size) in [(9, 16381), (4, 1021), (29, 65537)] {
            let before = build(&backends(n), size).unwrap().unwrap();
            let after = build(&backends(n + 1), size).unwrap().unwrap();
            let newcomer = n;
            let taken = after.iter().filter(|id| **id == newcomer).count();
            let fair = f64::from(size) / f64::from(n + 1);
            assert!(
                (taken as f64 - fair).abs() / fair <= 0.01,
                "N={n} M={size}: the newcomer took {taken}, fair {fair:.1}"
            );
            let moved = survivors_moved(&before, &after, newcomer);
            assert!(
                (moved as f64) / f64::from(size) <= 0.02,
                "N={n} M={size}: {moved} slots moved between the first {n}"
            );
        }
    }

    #[test]
    fn tables_are_the_same_on_every_machine() {
        // A fixed input gives this fixed table on every machine and every run: a change here
        // changes which backend running deployments pick for a flow, so it must be deliberate.
        let golden = [1, 2, 0, 0, 1, 0, 0, 2, 2, 1, 2, 0, 1];
        let list: Vec<MaglevBackend> = (0..3u32)
            .map(|i| MaglevBackend {
                id: i,
                identity: format!("10.0.0.{i}:8080").into_bytes(),
                weight: 1,
            })
            .collect();
        assert_eq!(build(&list, 13).unwrap().unwrap(), golden);
        let mut shuffled = list;
        shuffled.rotate_left(1);
        assert_eq!(build(&shuffled, 13).unwrap().unwrap(), golden);
    }

    #[test]
    fn weights_split_slots_proportionally() {
        let mut list = backends(2);
        list[1].weight = 3;
        let table = build(&list, 16381).unwrap().unwrap();
        let shares = shares(&table);
        let ratio = shares[&1] as f64 / shares[&0] as f64;
        assert!((ratio - 3.0).abs() < 0.05, "ratio {ratio}");
    }

    #[test]
    fn a_backend_that_stops_taking_flows_moves_no_other_backends_flows() {
        let backends: Vec<MaglevBackend> = (1..=6u8)
            .map(|i| MaglevBackend::at(u32::from(i), IpAddr::from([198, 18, 1, i]), 8080, 1))
            .collect();
        let all: Vec<(MaglevBackend, bool)> = backends.iter().map(|b| (b.clone(), true)).collect();
        let healthy = MaglevTable::build(&all, 1021).unwrap().unwrap();
        assert_eq!(healthy.fallback(), None);
        assert_eq!(healthy.slots.len(), 1021);
        // Backends 5 and 6 (a failed node's pods) stop taking new flows.
        let degraded: Vec<(MaglevBackend, bool)> =
            backends.iter().map(|b| (b.clone(), b.id <= 4)).collect();
        let table = MaglevTable::build(&degraded, 1021).unwrap().unwrap();
        // The first table is the healthy one: every slot of a live backend stays where it was.
        assert_eq!(table.first(), healthy.first());
        let fallback = table.fallback().unwrap();
        assert_eq!(fallback.len(), 1021);
        assert!(fallback.iter().all(|id| *id <= 4));
        // Where a flow lands: its first slot's backend when it is live, else the fallback's.
        let land = |slot: usize| match table.first()[slot] {
            id if id <= 4 => id,
            _ => fallback[slot],
        };
        let mut share = [0usize; 5];
        for slot in 0..1021 {
            share[land(slot) as usize] += 1;
        }
        // Evenly over the four live backends (Maglev's balance: within a few percent).
        assert!(
            share[1..].iter().all(|n| (230..=280).contains(n)),
            "{share:?}"
        );
        // None taking flows: no table.
        let none: Vec<(MaglevBackend, bool)> =
            backends.iter().map(|b| (b.clone(), false)).collect();
        assert_eq!(MaglevTable::build(&none, 1021).unwrap(), None);
    }
}
