//! GPT-2's byte-to-unicode table, for the tiny byte-level BPE tokenizers the tests write. Shared by
//! the root tests (`support::byte_level`) and runner's (`#[path]` include).

/// The printable character GPT-2's byte-level BPE uses for each byte value.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}
