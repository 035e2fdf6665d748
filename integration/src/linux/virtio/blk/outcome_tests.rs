// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Each request counts once in [`BlkStats`], in exactly one outcome, whatever happened
//! to it: the six outcome counters add up to the requests taken.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;

use super::flaky_memory::FlakyMemory;
use super::test_rig::*;
use super::BlkStats;
use crate::linux::virtio::test_driver::*;

const IMAGE_LEN: usize = 64 << 10;

/// The outcome counters, in the order of [`BlkStats`]' fields.
fn outcomes(stats: BlkStats) -> [u64; 6] {
    [
        stats.reads,
        stats.writes,
        stats.flushes,
        stats.get_ids,
        stats.unsupported,
        stats.failed,
    ]
}

const READ: usize = 0;
const WRITE: usize = 1;
const FLUSH: usize = 2;
const GET_ID: usize = 3;
const UNSUPPORTED: usize = 4;
const FAILED: usize = 5;

/// A request of each kind: its type, its data buffers, the outcome it counts in when
/// answered.
fn requests() -> [(u32, Vec<Buf>, usize); 6] {
    [
        (VIRTIO_BLK_T_IN, vec![writable(BUFFERS, 1024)], READ),
        (VIRTIO_BLK_T_OUT, vec![readable(BUFFERS, 512)], WRITE),
        (VIRTIO_BLK_T_FLUSH, vec![], FLUSH),
        (VIRTIO_BLK_T_GET_ID, vec![writable(BUFFERS, 20)], GET_ID),
        (
            VIRTIO_BLK_T_DISCARD,
            vec![readable(BUFFERS, 16)],
            UNSUPPORTED,
        ),
        // Past the end of the disk: answered VIRTIO_BLK_S_IOERR.
        (VIRTIO_BLK_T_IN, vec![writable(BUFFERS, 512)], FAILED),
    ]
}

#[test]
fn each_answered_request_counts_in_its_one_outcome() {
    let mut rig = Rig::new(&pattern(IMAGE_LEN, 1), 16, WITHOUT_EVENT_IDX);
    let mut expected = [0u64; 6];
    for (request_type, data, outcome) in requests() {
        let sector = if outcome == FAILED { 1 << 20 } else { 0 };
        rig.request(request_type, sector, &data);
        expected[outcome] += 1;
        assert_eq!(outcomes(rig.stats()), expected, "type {request_type}");
    }
    let stats = rig.stats();
    assert_eq!((stats.bytes_read, stats.bytes_written), (1024, 512));
}

#[test]
fn a_request_whose_status_cannot_be_written_once_it_ran_counts_only_as_failed() {
    for (request_type, data, outcome) in requests() {
        let memory = FlakyMemory::new();
        let driver = TestDriver::on(memory.clone(), 16);
        let mut rig = Rig::on(driver, &pattern(IMAGE_LEN, 1), WITHOUT_EVENT_IDX);
        let sector = if outcome == FAILED { 1 << 20 } else { 0 };
        rig.submit(request_type, sector, &data);
        // The status is written twice: VIRTIO_BLK_S_IOERR before the request runs, then
        // its answer. The first succeeds, the second is refused, as when the status
        // byte's page turns private while the request runs.
        memory.watch(STATUS, Some(1));
        rig.driver.notify(&mut rig.transport);
        assert_eq!(memory.lookups(), 2, "type {request_type}");
        memory.unwatch();
        assert_eq!(rig.driver.used_idx(), 0, "type {request_type}");
        assert_ne!(rig.transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        let stats = rig.stats();
        let mut expected = [0u64; 6];
        expected[FAILED] = 1;
        assert_eq!(outcomes(stats), expected, "type {request_type}");
        assert_eq!((stats.bytes_read, stats.bytes_written), (0, 0));
        let events = rig.events();
        assert!(events.contains("status byte at guest 0x8100"), "{events}");
    }
}
