//! Reading checkpoint files safely: the knowledge of PyTorch's pickle-based formats that every
//! weight reader in the workspace shares (`beit-model` for `pytorch_model.bin`, `beit-tokenizer`
//! for OpenAI's `encoder.pkl` / `decoder.pkl`).
//!
//! - [`check_pickle`] scans a pickle stream before it is read and refuses any that names a
//!   callable other than tensor-rebuilding and container types ([`pickle_guard`]); [`Allow`]
//!   adds module prefixes a reader trusts (e.g. `dall_e.`).
//!
//! ```
//! use beit_weights::{check_pickle, Allow};
//! let malicious = b"cos\nsystem\n(S'echo pwned'\ntR.";
//! let err = check_pickle(malicious, 1, &Allow::default()).unwrap_err();
//! assert!(err.contains("`os.system`"));
//! ```

mod allowlist;
pub mod pickle_guard;
mod scan;

pub use pickle_guard::{check_pickle, Allow};
