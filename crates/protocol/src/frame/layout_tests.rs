//! Each claim that `docs/protocol.md` makes about the bincode layout, checked
//! against the configuration the codec really uses.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{decode_body, wire_config};

fn enc<T: Serialize>(value: T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, wire_config()).expect("plain data always encodes")
}

fn dec<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, super::ProtocolError> {
    decode_body(bytes)
}

#[test]
fn u8_is_one_byte() {
    assert_eq!(enc(0xabu8), [0xab]);
}

#[test]
fn u16_is_two_bytes_big_endian() {
    assert_eq!(enc(0x0102u16), [0x01, 0x02]);
    assert_eq!(enc(1u16), [0x00, 0x01]);
}

#[test]
fn u32_is_four_bytes_big_endian() {
    assert_eq!(enc(0x0102_0304u32), [1, 2, 3, 4]);
    assert_eq!(enc(1u32), [0, 0, 0, 1]);
}

#[test]
fn u64_is_eight_bytes_big_endian_even_when_small() {
    assert_eq!(enc(0x0102_0304_0506_0708u64), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(enc(1u64), [0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(enc(u64::MAX), [0xff; 8]);
}

#[test]
fn bool_is_one_byte_zero_or_one_and_other_values_are_rejected() {
    assert_eq!(enc(false), [0]);
    assert_eq!(enc(true), [1]);
    assert_eq!(dec::<bool>(&[1]), Ok(true));
    assert!(dec::<bool>(&[2]).is_err());
}

#[test]
fn string_is_u64_length_then_utf8_bytes() {
    assert_eq!(enc("hé"), [0, 0, 0, 0, 0, 0, 0, 3, b'h', 0xc3, 0xa9]);
    assert_eq!(enc(String::new()), [0; 8]);
    assert!(dec::<String>(&[0, 0, 0, 0, 0, 0, 0, 1, 0xff]).is_err());
}

#[test]
fn bytes_and_byte_vectors_are_u64_length_then_raw_bytes() {
    let expected = [0, 0, 0, 0, 0, 0, 0, 2, 0xde, 0xad];
    assert_eq!(enc(Bytes::from_static(&[0xde, 0xad])), expected);
    assert_eq!(enc(vec![0xdeu8, 0xad]), expected);
    assert_eq!(
        dec::<Bytes>(&expected),
        Ok(Bytes::from_static(&[0xde, 0xad]))
    );
}

#[test]
fn vec_is_u64_count_then_items() {
    assert_eq!(enc(vec![1u16, 2]), [0, 0, 0, 0, 0, 0, 0, 2, 0, 1, 0, 2]);
    assert_eq!(enc(Vec::<u64>::new()), [0; 8]);
}

#[test]
fn option_is_zero_or_one_byte_then_the_value_and_other_tags_are_rejected() {
    assert_eq!(enc(None::<u16>), [0]);
    assert_eq!(enc(Some(0x0102u16)), [1, 1, 2]);
    assert!(dec::<Option<u16>>(&[2, 1, 2]).is_err());
}

#[test]
fn tuple_and_struct_are_their_fields_concatenated() {
    #[derive(Serialize)]
    struct Pair {
        a: u8,
        b: u16,
    }
    assert_eq!(enc((7u8, 0x0102u16)), [7, 1, 2]);
    assert_eq!(enc(Pair { a: 7, b: 0x0102 }), [7, 1, 2]);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Sample {
    Unit,
    Newtype(u8),
    Struct { a: u8, b: u16 },
}

#[test]
fn enum_is_u32_variant_index_then_fields_in_order() {
    assert_eq!(enc(Sample::Unit), [0, 0, 0, 0]);
    assert_eq!(enc(Sample::Newtype(9)), [0, 0, 0, 1, 9]);
    assert_eq!(
        enc(Sample::Struct { a: 7, b: 0x0102 }),
        [0, 0, 0, 2, 7, 1, 2]
    );
}

#[test]
fn enum_with_an_unknown_variant_index_is_rejected() {
    assert!(dec::<Sample>(&[0, 0, 0, 3]).is_err());
    assert!(dec::<Sample>(&[0xff, 0xff, 0xff, 0xff]).is_err());
}

#[test]
fn error_code_tag_is_its_numeric_code() {
    use crate::ErrorCode;
    for (n, code) in ErrorCode::ALL.into_iter().enumerate() {
        let n = u32::try_from(n).expect("26 codes");
        assert_eq!(code.as_u32(), n);
        assert_eq!(ErrorCode::from_u32(n), Some(code));
        assert_eq!(enc(code), n.to_be_bytes());
        assert_eq!(dec::<ErrorCode>(&n.to_be_bytes()), Ok(code));
    }
    let past = u32::try_from(ErrorCode::ALL.len()).expect("26 codes");
    assert_eq!(past, 26);
    assert_eq!(ErrorCode::from_u32(past), None);
    assert!(dec::<ErrorCode>(&past.to_be_bytes()).is_err());
}

#[test]
fn codes_newer_than_the_peer_are_replaced_by_ones_it_knows() {
    use crate::ErrorCode;
    for code in ErrorCode::ALL {
        assert_eq!(code.for_version(5), code, "{code:?}");
        let v4 = code.for_version(4);
        assert!(v4.introduced_in() <= 4, "{code:?} -> {v4:?}");
        if code.introduced_in() <= 4 {
            assert_eq!(v4, code);
        }
        let v3 = code.for_version(3);
        assert!(v3.introduced_in() <= 3, "{code:?} -> {v3:?}");
        if code.introduced_in() <= 3 {
            assert_eq!(v3, code);
        }
        let v2 = code.for_version(2);
        assert!(v2.introduced_in() <= 2, "{code:?} -> {v2:?}");
        if code.introduced_in() <= 2 {
            assert_eq!(v2, code);
        }
        let v1 = code.for_version(1);
        assert_eq!(v1.introduced_in(), 1, "{code:?} -> {v1:?}");
        if code.introduced_in() == 1 {
            assert_eq!(v1, code);
        }
    }
    assert_eq!(
        ErrorCode::TokenExpired.for_version(1),
        ErrorCode::Unauthorized
    );
    assert_eq!(ErrorCode::Forbidden.for_version(1), ErrorCode::Unauthorized);
    assert_eq!(
        ErrorCode::RateLimited.for_version(1),
        ErrorCode::OverCapacity
    );
    assert_eq!(
        ErrorCode::PositionMismatch.for_version(2),
        ErrorCode::InvalidRequest
    );
    assert_eq!(ErrorCode::GroupNotFound.introduced_in(), 4);
    for version in 1..=3 {
        assert_eq!(
            ErrorCode::GroupNotFound.for_version(version),
            ErrorCode::InvalidRequest
        );
    }
    assert_eq!(ErrorCode::ConnectionNotFound.introduced_in(), 5);
    for version in 1..=4 {
        assert_eq!(
            ErrorCode::ConnectionNotFound.for_version(version),
            ErrorCode::InvalidRequest
        );
    }
}
