//! The controller against a test guest memory and queue.

use super::*;
use crate::scsi::{Lun, LunKind, LunOptions};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const MIB: u64 = 1 << 20;

fn controller(dir: &std::path::Path) -> Controller {
    let image = crate::test_images::image(dir, "d.raw", 16 * MIB, "raw", false);
    let mut c = Controller::new(ControllerOptions::default());
    c.target_mut(0)
        .insert(0, Lun::new(Some(image), LunOptions::default()));
    c.target_mut(0).insert(
        1,
        Lun::new(
            None,
            LunOptions {
                kind: LunKind::Cdrom,
                ..Default::default()
            },
        ),
    );
    c
}

/// Runs one command on queue 2: request header at 0x10_0000 (+ data-out at 0x20_0000),
/// response at 0x30_0000 (+ data-in at 0x40_0000).
fn command(
    c: &Controller,
    mem: &GuestMemoryMmap,
    lun: [u8; 8],
    cdb: &[u8],
    out: &[u8],
    din: u32,
) -> (ScsiCompletion, [u8; CMD_RESP_LEN as usize]) {
    let mut req = [0u8; CMD_REQ_LEN as usize];
    req[0..8].copy_from_slice(&lun);
    req[19..19 + cdb.len()].copy_from_slice(cdb);
    mem.write_slice(&req, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(out, GuestAddress(0x20_0000)).unwrap();
    let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(
        0x10_0000,
        CMD_REQ_LEN as u32,
        0,
        0,
    ))];
    if !out.is_empty() {
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            0x20_0000,
            out.len() as u32,
            0,
            0,
        )));
    }
    descs.push(RawDescriptor::from(SplitDescriptor::new(
        0x30_0000,
        CMD_RESP_LEN as u32,
        WRITE,
        0,
    )));
    if din > 0 {
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            0x40_0000, din, WRITE, 0,
        )));
    }
    let queue = MockSplitQueue::new(mem, 64);
    let chain = queue.build_desc_chain(&descs).unwrap();
    let done = c.execute(FIRST_REQUEST_QUEUE, chain);
    let mut resp = [0u8; CMD_RESP_LEN as usize];
    mem.read_slice(&mut resp, GuestAddress(0x30_0000)).unwrap();
    (done, resp)
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap()
}

#[test]
fn commands_reach_their_lun() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(dir.path());
    let mem = memory();
    let lun0 = [1, 0, 0x40, 0, 0, 0, 0, 0];
    // WRITE(10) of 8 blocks, then READ(10) of them back through data-in.
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    let (done, resp) = command(&c, &mem, lun0, &[0x2a, 0, 0, 0, 0, 8, 0, 0, 8, 0], &data, 0);
    assert_eq!((resp[10], resp[11]), (0, S_OK));
    assert_eq!(done.used_len, CMD_RESP_LEN as u32);
    let (done, resp) = command(
        &c,
        &mem,
        lun0,
        &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0],
        &[],
        8192,
    );
    assert_eq!((resp[10], resp[11]), (0, S_OK));
    assert_eq!(done.used_len, CMD_RESP_LEN as u32 + 4096);
    assert_eq!(
        u32::from_le_bytes(resp[4..8].try_into().unwrap()),
        4096,
        "residue"
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(0x40_0000)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn errors_come_back_as_sense_and_responses() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(dir.path());
    let mem = memory();
    // The empty CD-ROM at LUN 1: CHECK CONDITION with NOT READY sense.
    let (_, resp) = command(&c, &mem, [1, 0, 0x40, 1, 0, 0, 0, 0], &[0; 6], &[], 0);
    assert_eq!((resp[10], resp[11]), (crate::scsi::CHECK_CONDITION, S_OK));
    assert_eq!(u32::from_le_bytes(resp[0..4].try_into().unwrap()), 18);
    assert_eq!((resp[12], resp[14], resp[24]), (0x70, 0x02, 0x3a));
    // A LUN the target lacks: LOGICAL UNIT NOT SUPPORTED; a target that does not exist:
    // BAD TARGET; a LUN field in another format: BAD TARGET.
    let (_, resp) = command(&c, &mem, [1, 0, 0x40, 9, 0, 0, 0, 0], &[0; 6], &[], 0);
    assert_eq!(
        (resp[10], resp[14], resp[24]),
        (crate::scsi::CHECK_CONDITION, 0x05, 0x25)
    );
    let (_, resp) = command(&c, &mem, [1, 5, 0x40, 0, 0, 0, 0, 0], &[0; 6], &[], 0);
    assert_eq!(resp[11], S_BAD_TARGET);
    let (_, resp) = command(&c, &mem, [2, 0, 0, 0, 0, 0, 0, 0], &[0; 6], &[], 0);
    assert_eq!(resp[11], S_BAD_TARGET);
    // REPORT LUNS through LUN 0 lists both.
    let (_, _) = command(
        &c,
        &mem,
        [1, 0, 0x40, 0, 0, 0, 0, 0],
        &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0],
        &[],
        64,
    );
    let mut list = [0u8; 24];
    mem.read_slice(&mut list, GuestAddress(0x40_0000)).unwrap();
    assert_eq!(u32::from_be_bytes(list[0..4].try_into().unwrap()), 16);
    assert_eq!(list[17], 1);
}

#[test]
fn control_queue_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(dir.path());
    let mem = memory();
    let mut tmf = [0u8; 24];
    tmf[4..8].copy_from_slice(&1u32.to_le_bytes()); // ABORT TASK SET
    mem.write_slice(&tmf, GuestAddress(0x10_0000)).unwrap();
    let queue = MockSplitQueue::new(&mem, 16);
    let chain = queue
        .build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 24, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x30_0000, 1, WRITE, 0)),
        ])
        .unwrap();
    mem.write_slice(&[0xff], GuestAddress(0x30_0000)).unwrap();
    assert_eq!(c.execute(CONTROL_QUEUE, chain).used_len, 1);
    let mut r = [0u8];
    mem.read_slice(&mut r, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(r[0], S_FUNCTION_COMPLETE);
    let cfg = c.config_bytes();
    assert_eq!(cfg.len(), 36);
    assert_eq!(
        u32::from_le_bytes(cfg[20..24].try_into().unwrap()),
        SENSE_SIZE as u32
    );
    assert_eq!(
        u32::from_le_bytes(cfg[24..28].try_into().unwrap()),
        CDB_SIZE as u32
    );
    assert_eq!(c.queue_count(), 3);
    assert_eq!(decode_lun(&[1, 3, 0x40, 0x2c, 0, 0, 0, 0]), Some((3, 44)));
}

#[test]
fn short_requests_are_returned_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let c = controller(dir.path());
    let mem = memory();
    let queue = MockSplitQueue::new(&mem, 16);
    let chain = queue
        .build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 20, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(
                0x30_0000,
                CMD_RESP_LEN as u32,
                WRITE,
                0,
            )),
        ])
        .unwrap();
    assert_eq!(c.execute(FIRST_REQUEST_QUEUE, chain).used_len, 0);
}
