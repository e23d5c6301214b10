//! Fuzzes the sans-IO SNI reader: never panics, and the verdict never
//! depends on where the reads split the stream.
#![no_main]

use edge_proto::client_hello::{parse, Parse};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 16384;

/// The verdict with the `Malformed` reason erased: the reason may be worded
/// differently once more bytes are known, the kind may not.
fn kind(p: &Parse) -> (u8, &'static str, Option<&str>) {
    match p {
        Parse::Incomplete => (0, "", None),
        Parse::Rejected(r) => (1, r.label(), None),
        Parse::Found(name) => (2, "", Some(name)),
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = parse(data, CAP);
    if let Parse::Found(name) = &whole {
        assert!(!name.is_empty());
        assert_eq!(name, &name.to_ascii_lowercase());
    }

    let n = data.len();
    let splits = [
        1,
        3,
        5,
        6,
        9,
        10,
        44,
        n / 3,
        n / 2,
        n - n / 4,
        n.saturating_sub(1),
    ];
    for split in splits {
        if split >= n {
            continue;
        }
        let early = parse(&data[..split], CAP);
        // A verdict reached on a prefix is final. (Prefixes are shorter than
        // the cap here, so "more bytes than the cap" cannot be the reason.)
        if early != Parse::Incomplete && split < CAP {
            assert_eq!(
                kind(&early),
                kind(&whole),
                "prefix {split}: {early:?}, whole: {whole:?}"
            );
        }
    }

    // A cap is never exceeded by a Found hello, whatever the cap.
    for cap in [0, 5, 9, 64, 512, n / 2, n] {
        if cap > CAP {
            continue;
        }
        let capped = parse(data, cap);
        if let Parse::Found(_) = capped {
            // Found under a cap implies Found under the larger default cap.
            assert_eq!(capped, whole, "cap {cap}");
        }
    }
});
