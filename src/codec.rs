//! bincode 2 decoding with a bound on what a length read from the bytes may allocate.
//!
//! bincode's `config::standard()` has no size limit: a corrupt length prefix of 2^62 makes the
//! decoder ask for that much memory and the process abort. Every record and stamp is decoded
//! here instead, under the smallest limit of a ladder that is at least the input's own length:
//! a valid value never needs more (bincode counts the bytes it reads against the limit), and a
//! bad length can claim at most `max(1 MiB, 64 x input)` before it is refused as corrupt.

use serde::de::DeserializeOwned;

type Decoded<T> = Result<(T, usize), bincode::error::DecodeError>;

macro_rules! ladder {
    ($bytes:expr, $($limit:literal),+) => {{
        let len = $bytes.len();
        $(
            if len <= $limit {
                return bincode::serde::decode_from_slice(
                    $bytes,
                    bincode::config::standard().with_limit::<$limit>(),
                );
            }
        )+
    }};
}

/// Decodes a value from `bytes`; returns it and the bytes used.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Decoded<T> {
    ladder!(
        bytes,
        1_048_576,
        16_777_216,
        268_435_456,
        4_294_967_296,
        68_719_476_736
    );
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_length_is_an_error_not_an_allocation() {
        // A Vec<u8> whose varint length says 2^62 (0xFD then 8 bytes, little endian).
        let mut bytes = vec![0xFD];
        bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(decode::<Vec<u8>>(&bytes).is_err());
        assert!(decode::<String>(&bytes).is_err());
        assert!(decode::<Vec<f32>>(&bytes).is_err());
        // A valid value still decodes.
        let ok =
            bincode::serde::encode_to_vec(vec![7u8; 300], bincode::config::standard()).unwrap();
        assert_eq!(decode::<Vec<u8>>(&ok).unwrap().0, vec![7u8; 300]);
    }
}
