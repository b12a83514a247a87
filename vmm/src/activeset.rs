//! Learning the ActiveSet: which pages the app uses, overall and per listening port.
//!
//! The page tables are built fresh at every restore, so their Accessed bits say exactly
//! which pages the app has touched since (measured on kvm_pvm; see PLATFORM.md). A snapshot
//! puts those pages first. To also know which pages serve *each port*, the VMM cuts the
//! app's life into request episodes: an episode begins when the app accepts a connection
//! on a listening port and ends when it closes that connection (or accepts the next
//! one). At each boundary it *harvests*: reads and clears every A bit. What was set
//! during an episode belongs to that port's set, and everything harvested also counts
//! for the overall set, so clearing the bits loses nothing.
//!
//! A harvest clears A bits, which is only sound together with dropping every cached
//! translation (see `AddressSpace::maybe_cached`), so it runs on the vCPU thread just
//! before the guest re-enters, never on the mailbox thread while the guest runs. It costs
//! a walk of the page tables, one full invalidation (about 0.1 ms on kvm_pvm) and the
//! refaults of the pages touched next: every page the app uses must fault again for its
//! A bit to be set, which costs a Python request ~12 ms on kvm_pvm (0.9 ms otherwise). So
//! episodes are sampled: on each port, the first after the tables were built, then each
//! [`MIN_EPISODE_GAP`] after the last, the gap doubling with every sample up to
//! [`MAX_EPISODE_GAP`]. The requests right after a restore, which are what a prefetch is
//! for, are learnt from at once; a busy app then pays for a sample a minute, and a mostly
//! idle one not for every request.
//!
//! A restore that prefetches pages builds their entries with A = 1, which says nothing
//! about the app. Those bits are *unknown* until the first harvest. There they are not
//! evidence, but they are not forgotten either: the pages were prefetched because the
//! snapshot's set for the first client's port held them, so the first episode on that
//! port keeps them in its set (and in the overall one), as the snapshot had them. Dropping
//! them instead made every other swap-in of a big app slow: the snapshot after a
//! prefetched restore knew none of the pages its request used (they never faulted), so
//! the next restore prefetched nothing and faulted its 8 MiB in a chunk at a time (~1 s
//! over a 20 ms link, against ~0.2 s), and the one after that was fast again. If no
//! harvest ever happens the preset bits stand, and the previous ActiveSet is kept.

use picocenter_snapshots::format::PortSet;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

/// The least time between the first two harvested episodes on one port.
pub const MIN_EPISODE_GAP: Duration = Duration::from_millis(50);
/// The most time between two harvested episodes on one port.
pub const MAX_EPISODE_GAP: Duration = Duration::from_secs(60);

/// Why a restore built page-table entries with A = 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Presets {
    /// They are the snapshot's hot set: that port's set, or (none) its app-wide
    /// ActiveSet. The first harvest keeps them there.
    HotSet(Option<u16>),
    /// They are every stored page (an eager restore): no evidence of use, not kept.
    #[default]
    Everything,
}

/// One request episode: a connection accepted on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Episode {
    port: u16,
    /// The app's fd for the accepted connection.
    fd: i32,
}

/// The ActiveSet learned so far (pages as virtual page numbers).
#[derive(Debug, Default)]
pub struct ActiveSet {
    /// Pages seen accessed at harvests since the tables were built.
    touched: HashSet<u64>,
    /// Pages whose A bit a restore preset, until the first harvest.
    unknown: HashSet<u64>,
    /// Where the presets came from.
    presets: Presets,
    /// Pages touched in each port's episodes.
    ports: BTreeMap<u16, BTreeSet<u64>>,
    /// The episode the accesses since the last harvest belong to.
    current: Option<Episode>,
    /// The episode that begins at the next harvest.
    next: Option<Episode>,
    /// The current episode has ended; the next harvest closes it.
    ending: bool,
    /// When each port's last harvested episode began, and how many it has had.
    last_begin: HashMap<u16, (Instant, u32)>,
    /// Harvests done.
    harvests: u64,
    /// The tables were built by a restore (not by the app's own start).
    restored: bool,
}

impl ActiveSet {
    /// After a restore: the tables are new, and the entries of `vpns` were built with
    /// A = 1, for the reason `presets` gives.
    pub fn restored(&mut self, vpns: impl IntoIterator<Item = u64>, presets: Presets) {
        self.restored = true;
        self.unknown.extend(vpns);
        self.presets = presets;
    }

    /// The app accepted connection `fd` on `port`: an episode begins, unless the port's
    /// last one began less than [`episode_gap`] ago.
    pub fn accepted(&mut self, port: u16, fd: i32) {
        let now = Instant::now();
        let sampled = match self.last_begin.get(&port) {
            Some(&(last, count)) if now.duration_since(last) < episode_gap(count) => return,
            Some(&(_, count)) => count,
            None => 0,
        };
        self.last_begin
            .insert(port, (now, sampled.saturating_add(1)));
        let episode = Episode { port, fd };
        if self.restored && self.harvests == 0 && self.current.is_none() {
            // The first request after a restore is the one a client waits on: a harvest
            // now would throw away the prefetched translations just before the app needs
            // them. The bits this episode leaves (and the few of resuming) are read at its
            // end, the restore's presets dropped.
            self.current = Some(episode);
            return;
        }
        self.ending = self.current.is_some();
        self.next = Some(episode);
    }

    /// The app closed `fd`: if that is the current episode's connection, the episode ends.
    pub fn closed(&mut self, fd: i32) {
        if self.current.is_some_and(|e| e.fd == fd) {
            self.ending = true;
        }
        if self.next.is_some_and(|e| e.fd == fd) {
            // Closed before the VMM got to harvest: the episode's accesses are all in the
            // bits the pending harvest reads.
            self.current = self.next.take();
            self.ending = true;
        }
    }

    /// Whether a harvest is due before the guest runs again.
    pub fn harvest_due(&self) -> bool {
        self.ending || self.next.is_some()
    }

    /// Takes the pages whose A bit was set since the last harvest (the caller cleared the
    /// bits and will invalidate before the guest runs).
    pub fn harvest(&mut self, accessed: Vec<u64>) {
        self.harvests += 1;
        let unknown = std::mem::take(&mut self.unknown);
        let (presets, evidence): (Vec<u64>, Vec<u64>) =
            accessed.into_iter().partition(|vpn| unknown.contains(vpn));
        // The presets of a hot set are kept where they came from (see the module's
        // description): the overall set, and the set of the port they were prefetched
        // for. Those of an eager restore (every stored page) say nothing.
        let kept_for = match self.presets {
            Presets::HotSet(port) => {
                self.touched.extend(&presets);
                port
            }
            Presets::Everything => None,
        };
        match self.current {
            Some(episode) => {
                let port = self.ports.entry(episode.port).or_default();
                if kept_for == Some(episode.port) {
                    port.extend(&presets);
                }
                for vpn in evidence {
                    port.insert(vpn);
                    self.touched.insert(vpn);
                }
            }
            None => self.touched.extend(evidence),
        }
        if self.ending {
            self.current = None;
            self.ending = false;
        }
        if let Some(next) = self.next.take() {
            self.current = Some(next);
        }
    }

    /// Whether page `vpn`, with A bit `accessed` now, is in the ActiveSet.
    pub fn contains(&self, vpn: u64, accessed: bool) -> bool {
        accessed || self.touched.contains(&vpn)
    }

    /// The per-port sets, for a snapshot.
    pub fn port_sets(&self) -> Vec<PortSet> {
        self.ports
            .iter()
            .map(|(&port, pages)| PortSet {
                port,
                pages: picocenter_snapshots::chain::ranges(pages.iter().copied()),
            })
            .collect()
    }

    /// Harvests done so far.
    pub fn harvests(&self) -> u64 {
        self.harvests
    }
}

/// The least time between a port's episode number `sampled` (from 1) and the next one
/// harvested: [`MIN_EPISODE_GAP`], doubled for each sample after the first, at most
/// [`MAX_EPISODE_GAP`].
pub fn episode_gap(sampled: u32) -> Duration {
    let doublings = sampled.saturating_sub(1).min(16);
    MIN_EPISODE_GAP
        .saturating_mul(1 << doublings)
        .min(MAX_EPISODE_GAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_gets_what_was_touched_between_its_harvests() {
        let mut set = ActiveSet::default();
        set.accepted(80, 5);
        assert!(set.harvest_due());
        set.harvest(vec![1, 2]); // before the episode: overall only
        assert!(!set.harvest_due());
        set.closed(5);
        assert!(set.harvest_due());
        set.harvest(vec![3, 4]);
        assert_eq!(set.port_sets()[0].pages.len(), 1);
        assert_eq!(set.port_sets()[0].pages[0].vpn, 3);
        assert_eq!(set.port_sets()[0].pages[0].count, 2);
        for vpn in 1..=4 {
            assert!(set.contains(vpn, false));
        }
        assert!(!set.contains(9, false));
        assert!(set.contains(9, true));
        // Episodes closer together than the gap are not harvested.
        set.accepted(80, 6);
        assert!(!set.harvest_due());
    }

    #[test]
    fn presets_stay_with_the_port_they_were_prefetched_for() {
        let mut set = ActiveSet::default();
        set.restored([7, 8], Presets::HotSet(Some(443)));
        // The first episode after the restore is not cut at its start...
        set.accepted(443, 3);
        assert!(!set.harvest_due());
        // ...but at its end: the presets stay in the port's set and the overall one.
        set.closed(3);
        assert!(set.harvest_due());
        set.harvest(vec![7, 8, 9]);
        for vpn in [7, 8, 9] {
            assert!(set.contains(vpn, false));
        }
        assert_eq!(
            set.port_sets()[0].pages,
            picocenter_snapshots::chain::ranges([7, 8, 9])
        );
        // Later harvests count every bit.
        std::thread::sleep(MIN_EPISODE_GAP);
        set.accepted(443, 3);
        set.harvest(vec![]);
        set.closed(3);
        set.harvest(vec![11]);
        assert_eq!(
            set.port_sets()[0].pages,
            picocenter_snapshots::chain::ranges([7, 8, 9, 11])
        );
    }

    #[test]
    fn presets_are_no_evidence_for_another_port() {
        // Prefetched for port 80 (or app-wide), but the first client came to 443: the
        // presets say nothing about 443's requests.
        for preset_port in [Some(80), None] {
            let mut set = ActiveSet::default();
            set.restored([7, 8], Presets::HotSet(preset_port));
            set.accepted(443, 3);
            set.closed(3);
            set.harvest(vec![7, 8, 9]);
            assert_eq!(
                set.port_sets()[0].pages,
                picocenter_snapshots::chain::ranges([9]),
                "{preset_port:?}"
            );
            // They stay in the overall set, which they came from.
            assert!(set.contains(7, false));
        }
    }

    #[test]
    fn an_eager_restores_presets_are_not_kept() {
        let mut set = ActiveSet::default();
        set.restored([7, 8], Presets::Everything);
        set.accepted(80, 3);
        set.closed(3);
        set.harvest(vec![7, 8, 9]);
        assert!(!set.contains(7, false));
        assert_eq!(
            set.port_sets()[0].pages,
            picocenter_snapshots::chain::ranges([9])
        );
    }

    #[test]
    fn samples_grow_rarer_on_a_busy_port() {
        assert_eq!(episode_gap(1), MIN_EPISODE_GAP);
        assert_eq!(episode_gap(2), MIN_EPISODE_GAP * 2);
        assert_eq!(episode_gap(3), MIN_EPISODE_GAP * 4);
        assert_eq!(episode_gap(12), MAX_EPISODE_GAP);
        assert_eq!(episode_gap(u32::MAX), MAX_EPISODE_GAP);
        let mut set = ActiveSet::default();
        set.accepted(80, 5);
        set.harvest(vec![]);
        set.closed(5);
        set.harvest(vec![]);
        std::thread::sleep(MIN_EPISODE_GAP);
        // The second sample waits one gap...
        set.accepted(80, 6);
        assert!(set.harvest_due());
        set.harvest(vec![]);
        set.closed(6);
        set.harvest(vec![]);
        // ...the third two, and another port has its own count.
        std::thread::sleep(MIN_EPISODE_GAP);
        set.accepted(80, 7);
        assert!(!set.harvest_due());
        set.accepted(443, 8);
        assert!(set.harvest_due());
    }

    #[test]
    fn a_connection_closed_before_the_harvest_still_makes_an_episode() {
        let mut set = ActiveSet::default();
        set.accepted(80, 4);
        set.closed(4);
        set.harvest(vec![10]);
        assert_eq!(set.port_sets()[0].pages[0].vpn, 10);
        assert!(!set.harvest_due());
    }
}
