//! Seed derivation: how every random stream of beit-rs is keyed.
//!
//! candle cannot seed its CPU generator, so beit-rs draws all its randomness on the host from
//! generators keyed by small tuples of integers: the run seed, then what the draw is for (an epoch,
//! a step, a sample's global index, a draw counter...). Keying by position rather than by a shared
//! sequence is what makes a resumed run and a data-parallel run draw exactly what one uninterrupted
//! process draws. This crate is the one place that says how a tuple becomes a seed.
//!
//! # The scheme
//!
//! Everything is built on SplitMix64's output function [`mix64`], a bijection of 64 bits in which
//! every input bit affects every output bit, so nearby inputs (`seed`, `seed + 1`) give unrelated
//! outputs. A tuple is folded into a running state with [`absorb`]: `state' = mix64(state ^ key)`.
//!
//! * [`chain`]`(start, keys)`: fold `keys` into `start`, one [`absorb`] each;
//! * [`derive_seed`]`(seed, keys)`: `chain(mix64(seed), keys mixed one by one)`, the seed of a
//!   `StdRng` for a purpose (sample augmentations, epoch shuffles);
//! * [`stream_id`]`(keys)`: `chain(GOLDEN_GAMMA, keys)`, the stream number of a ChaCha generator
//!   whose key is the run seed (the engine's checkpointed generator);
//! * [`key_words`]: a 32-byte ChaCha key laid out from four words, for generators keyed directly
//!   by `(seed, step, index, tag)` (mask sampling), where the tag keeps uses of one seed apart.
//!
//! The users and their tuples: beit-data (`derive_seed(seed, [epoch, 0])` for an epoch's order,
//! `[epoch, index, 1]` for a sample's augmentations), beit-model (dropout / drop-path values
//! `chain(mix64(seed), [draw, sample, element])`), beit-mim (a sample's mask:
//! `key_words([seed, step, index, "beit-mim"])`), beit-train (`stream_id(keys)` for
//! `TrainRng::derive`).

/// SplitMix64's increment, the 64-bit golden ratio `2^64 / φ`.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (Steele, Lea and Flood 2014): a bijective mix of 64 bits.
#[inline]
pub const fn mix64(z: u64) -> u64 {
    let z = z.wrapping_add(GOLDEN_GAMMA);
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Absorb `key` into the running `state`: `mix64(state ^ key)`.
#[inline]
pub const fn absorb(state: u64, key: u64) -> u64 {
    mix64(state ^ key)
}

/// Fold `keys` into `start`, one [`absorb`] each.
pub fn chain(start: u64, keys: &[u64]) -> u64 {
    keys.iter().fold(start, |s, &k| absorb(s, k))
}

/// The seed for `keys` (epoch, sample index, purpose tag...) under the run `seed`. Each key is
/// mixed before it is absorbed, so small keys in different positions do not cancel.
pub fn derive_seed(seed: u64, keys: &[u64]) -> u64 {
    keys.iter().fold(mix64(seed), |s, &k| absorb(s, mix64(k)))
}

/// The stream number for `keys` of a generator keyed by the run seed.
pub fn stream_id(keys: &[u64]) -> u64 {
    chain(GOLDEN_GAMMA, keys)
}

/// A 32-byte generator key whose four little-endian words are `words`.
pub fn key_words(words: [u64; 4]) -> [u8; 32] {
    let mut key = [0u8; 32];
    for (chunk, w) in key.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    key
}

/// Eight ASCII bytes as a key word (a purpose tag such as `b"beit-mim"`).
pub const fn tag(bytes: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix64_matches_splitmix64_reference() {
        // SplitMix64 seeded with 0: the first output is mix64(0) (state advanced by the gamma).
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
        assert_ne!(mix64(1), mix64(2));
    }

    #[test]
    fn derivations_are_compositions_of_absorb() {
        assert_eq!(chain(7, &[]), 7);
        assert_eq!(chain(7, &[1, 2]), absorb(absorb(7, 1), 2));
        assert_eq!(
            derive_seed(3, &[4, 5]),
            absorb(absorb(mix64(3), mix64(4)), mix64(5))
        );
        assert_eq!(stream_id(&[9]), absorb(GOLDEN_GAMMA, 9));
        assert_ne!(derive_seed(1, &[0, 1]), derive_seed(1, &[1, 0]));
    }

    #[test]
    fn key_words_are_little_endian() {
        let k = key_words([1, 2, 3, tag(b"beit-mim")]);
        assert_eq!(k[0], 1);
        assert_eq!(k[8], 2);
        assert_eq!(k[16], 3);
        assert_eq!(&k[24..], b"beit-mim");
    }
}
