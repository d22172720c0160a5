use super::*;

#[test]
fn keys_display_as_strings_or_hex() {
    assert_eq!(display_key(b"\xa5hello"), "hello");
    assert_eq!(display_key(&[0xd9, 2, b'h', b'i']), "hi");
    assert_eq!(display_key(&[0x01, 0xff]), "01ff");
    // A string header that does not match the length is not a string.
    assert_eq!(display_key(&[0xa5, b'h']), "a568");
}

#[test]
fn a_full_snapshot_batch_fits_in_the_frame_limit() {
    use tandem_protocol::{MIRROR_BATCH_ENTRIES, MirrorEntry, Mirrored};
    let channel = "a-channel-name";
    let entry = |n: usize, payload: usize| MirrorEntry {
        channel: channel.into(),
        key: Bytes::from(format!("key-{n}")),
        epoch: u64::MAX,
        seq: u64::MAX,
        payload: Bytes::from(vec![0xc0; payload]),
        revision: Some(u64::MAX),
    };
    for (max, payload) in [(4096, 10), (4096, 300), (64 * 1024, 1000), (1 << 24, 60_000)] {
        // Batches filled as the snapshot fills them: up to the budget or the entry count.
        let budget = mirror::batch_budget(max);
        let (mut batch, mut bytes) = (Vec::new(), 0);
        for n in 0..MIRROR_BATCH_ENTRIES {
            let e = entry(n, payload);
            let size = mirror::entry_size(channel, &e.key, &e.payload);
            if !batch.is_empty() && bytes + size > budget {
                break;
            }
            bytes += size;
            batch.push(e);
        }
        let frame = Frame::Mirrored(Mirrored { entries: batch, removed: vec![], synced: true });
        let body = frame.encode_body().unwrap();
        assert!(body.len() <= max, "a batch of {bytes} counted bytes is {} bytes, over {max}", body.len());
        assert!(body.len() <= bytes + mirror::MIRRORED_HEADROOM, "the counts are an upper bound");
    }
}
