//! Bit-exact parity with the Python reference generator.
//!
//! `MaskingGenerator::sample` takes any `RngCore`. Fed the raw words of CPython's Mersenne
//! Twister (`random.Random(seed)`), it must draw exactly the masks of the Python restatement of
//! the reference algorithm (`fixtures/mim/exact_masks.json`, from `scripts/fixtures/mim_fixtures.py`).
//! This pins down every detail the statistics cannot see at once: the order of the draws, the
//! area and aspect-ratio formulas, half-to-even rounding, the strict side bound, inclusive corner
//! ranges, the overlap rule and the early stop.

use beit_mim::{MaskSampler, MaskingConfig, MaskingGenerator};
use rand::RngCore;
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/mim/exact_masks.json"
);

/// MT19937 seeded like CPython's `random.seed(int)` (`init_by_array` over the 32-bit words of
/// the integer). Written from the published algorithm (Matsumoto & Nishimura, 1998).
struct PyMersenne {
    state: [u32; 624],
    index: usize,
}

impl PyMersenne {
    fn new(seed: u64) -> Self {
        let mut key: Vec<u32> = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut mt = [0u32; 624];
        mt[0] = 19_650_218;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        Self {
            state: mt,
            index: 624,
        }
    }

    fn twist(&mut self) {
        for k in 0..624 {
            let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[k] = self.state[(k + 397) % 624] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }
}

impl RngCore for PyMersenne {
    /// `genrand_uint32`, which Python's `getrandbits(k <= 32)` shifts right by `32 − k`.
    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// The 53 bits of Python's `random()` (27 bits of one word, then 26 of the next), placed at
    /// the top of the 64-bit word.
    fn next_u64(&mut self) -> u64 {
        let a = u64::from(self.next_u32() >> 5);
        let b = u64::from(self.next_u32() >> 6);
        ((a << 26) | b) << 11
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(4) {
            let w = self.next_u32().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(FIXTURE).expect("read exact_masks.json"))
        .expect("parse exact_masks.json")
}

#[test]
fn mersenne_twister_matches_cpython() {
    let doc = fixture();
    let mut mt = PyMersenne::new(doc["seed"].as_u64().unwrap());
    for w in doc["first_words"].as_array().unwrap() {
        assert_eq!(u64::from(mt.next_u32()), w.as_u64().unwrap());
    }
    let mut mt = PyMersenne::new(doc["seed"].as_u64().unwrap());
    assert_eq!(
        mt.next_u64() >> 11,
        doc["first_random_bits"].as_u64().unwrap()
    );
}

#[test]
fn masks_are_identical_to_the_python_reference() {
    let doc = fixture();
    for entry in doc["configs"].as_array().unwrap() {
        let c = &entry["config"];
        let size = c["input_size"].as_array().unwrap();
        let cfg = MaskingConfig {
            input_size: [
                size[0].as_u64().unwrap() as usize,
                size[1].as_u64().unwrap() as usize,
            ],
            num_masking_patches: c["num_masking_patches"].as_u64().unwrap() as usize,
            min_num_patches: c["min_num_patches"].as_u64().unwrap() as usize,
            max_num_patches: c["max_num_patches"].as_u64().map(|v| v as usize),
            min_aspect: c["min_aspect"].as_f64().unwrap(),
            ..MaskingConfig::default()
        };
        let g = MaskingGenerator::new(&cfg).unwrap();
        // One stream per configuration, consumed mask after mask as the Python loop does.
        let mut rng = PyMersenne::new(entry["seed"].as_u64().unwrap());
        let masks = entry["masks"].as_array().unwrap();
        assert!(masks.len() >= 50);
        for (i, want) in masks.iter().enumerate() {
            let got: String = g
                .sample(&mut rng)
                .iter()
                .map(|&b| if b { '1' } else { '0' })
                .collect();
            assert_eq!(
                got,
                want.as_str().unwrap(),
                "{}: mask {i} differs from Python",
                c["name"]
            );
        }
    }
}
