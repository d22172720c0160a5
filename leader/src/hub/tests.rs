use super::*;

#[test]
fn keys_display_as_strings_or_hex() {
    assert_eq!(display_key(b"\xa5hello"), "hello");
    assert_eq!(display_key(&[0xd9, 2, b'h', b'i']), "hi");
    assert_eq!(display_key(&[0x01, 0xff]), "01ff");
    // A string header that does not match the length is not a string.
    assert_eq!(display_key(&[0xa5, b'h']), "a568");
}
