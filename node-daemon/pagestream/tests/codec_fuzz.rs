//! Property tests of the frame decoder (a bounded fuzz run inside `cargo
//! test`): any byte sequence decodes to a frame or a precise error without
//! panicking, valid frames round-trip, and no single-bit flip or truncation
//! of a valid frame is ever accepted.

use proptest::prelude::*;
use vmstream_pagestream::frame::FrameCommand;
use vmstream_pagestream::wire::{
    Command, FrameError, HEADER_LEN, Header, MAX_BATCH_PAGES, MAX_INDEX_PAGES, decode_frame,
};
use vmstream_vmm::memory::PAGE_SIZE;

/// A valid frame: command, ids and a payload that fits the command's rules.
fn valid_frame() -> impl Strategy<Value = (Header, Vec<u8>)> {
    let small = prop_oneof![
        Just(Command::Hello),
        Just(Command::Challenge),
        Just(Command::Auth),
        Just(Command::Accept),
        Just(Command::Reject),
        Just(Command::Error),
    ];
    let unranged = (small, any::<u64>()).prop_flat_map(|(c, id)| {
        let max = c.payload_limit().min(64) as usize;
        prop::collection::vec(any::<u8>(), 0..=max)
            .prop_map(move |payload| (Header::new(c).with_request(id), payload))
    });
    let read = (any::<u64>(), 0u64..1 << 40, 1..=MAX_BATCH_PAGES).prop_map(|(id, first, n)| {
        (
            Header::new(Command::ReadPages)
                .with_request(id)
                .with_range(first, n),
            Vec::new(),
        )
    });
    let pages = (any::<u64>(), 0u64..1 << 40, 1..=8u32, any::<u8>()).prop_flat_map(
        |(id, first, n, fill)| {
            (0..=n).prop_map(move |sent| {
                (
                    Header::new(Command::Pages)
                        .with_request(id)
                        .with_range(first, n),
                    vec![fill; sent as usize * PAGE_SIZE],
                )
            })
        },
    );
    let index = (0u64..1 << 20, 1..=4096u32, any::<u64>()).prop_map(|(w, n, id)| {
        let words = (n as usize).div_ceil(64);
        (
            Header::new(Command::Index)
                .with_request(id)
                .with_range(w * 64, n),
            vec![0xa5; words * 8],
        )
    });
    prop_oneof![unranged, read, pages, index]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn arbitrary_headers_after_a_valid_magic_never_panic(
        rest in prop::collection::vec(any::<u8>(), 0..120),
        version in 0u16..3,
        command in 0u16..14,
    ) {
        let mut bytes = b"VMSP".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&command.to_le_bytes());
        bytes.extend_from_slice(&rest);
        if let Err(e) = decode_frame(&bytes) {
            // Every error renders a message that names the problem.
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn valid_frames_round_trip((header, payload) in valid_frame()) {
        let bytes = header.encode_frame(&payload);
        let (h, p, used) = decode_frame(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(p, &payload[..]);
        prop_assert_eq!(h.command, header.command);
        prop_assert_eq!(h.request_id, header.request_id);
        prop_assert_eq!(h.range(), header.range());
        prop_assert_eq!(h.payload_len as usize, payload.len());
    }

    #[test]
    fn no_bit_flip_or_truncation_is_accepted(
        (header, payload) in valid_frame(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = header.encode_frame(&payload);
        let mut flipped = bytes.clone();
        let i = at.index(bytes.len());
        flipped[i] ^= 1 << bit;
        prop_assert!(decode_frame(&flipped).is_err(), "flip at byte {} accepted", i);
        let n = cut.index(bytes.len());
        match decode_frame(&bytes[..n]) {
            Err(FrameError::Truncated { needed, available }) => {
                prop_assert_eq!(available, n);
                prop_assert!(needed > n);
            }
            other => prop_assert!(false, "truncation to {} gave {:?}", n, other),
        }
    }
}

#[test]
fn limits_are_the_documented_ones() {
    assert_eq!(HEADER_LEN, 40);
    assert_eq!(MAX_BATCH_PAGES, 256);
    assert_eq!(MAX_INDEX_PAGES, 512 * 1024);
}
