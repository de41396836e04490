//! Inputs shared by the benchmarks.

/// `n` bytes that compress like chat traffic: JSON-ish messages with user ids, room ids,
/// timestamps and text from a small vocabulary, chosen by a fixed pseudo-random sequence (the
/// same bytes on every run).
pub fn chat_like(n: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "hello", "see", "you", "at", "the", "meeting", "tomorrow", "ok", "thanks", "photo",
        "lunch", "where", "are", "we", "going", "tonight", "call", "me", "later", "sure", "great",
        "news", "project", "deadline", "friday", "weekend", "plans", "coffee", "running", "late",
    ];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = String::with_capacity(n + 128);
    while out.len() < n {
        let r = next();
        out.push_str(&format!(
            "{{\"sender\":\"u{}\",\"room\":\"r{}\",\"ts\":{},\"text\":\"",
            r % 5000,
            (r >> 20) % 64,
            1_764_028_800_000 + (r >> 8) % 86_400_000
        ));
        for i in 0..(3 + next() % 12) {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
        }
        out.push_str("\"}\n");
    }
    out.truncate(n);
    out.into_bytes()
}
