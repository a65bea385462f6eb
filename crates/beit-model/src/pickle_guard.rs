//! A static check of pickle streams before they are read: every callable a pickle names (`GLOBAL`,
//! `INST`, `STACK_GLOBAL`) must be on an allowlist of tensor-rebuilding and container types.
//!
//! Our readers never execute a pickle (candle's virtual machine builds an inert object tree), so a
//! malicious file cannot run code here. But a `pytorch_model.bin` or `.pkl` that names `os.system`,
//! `posix.system`, `builtins.eval` or `subprocess.Popen` would run code in the next Python tool that
//! opens it, and no genuine checkpoint needs them: such files are refused with an error naming the
//! callable, as PyTorch's `weights_only` unpickler does.
//!
//! The scan walks the opcodes with their exact argument sizes (checked against the remaining
//! bytes, so a hostile length cannot make it read out of bounds or allocate more than the input),
//! and it remembers the strings pushed just before a `STACK_GLOBAL` (directly or through the memo)
//! to know which callable it builds. A `STACK_GLOBAL` whose module or name is computed some other
//! way, and the extension-registry opcodes, are refused as well.

use std::collections::HashMap;

/// What a pickle may name, beyond the built-in allowlist: extra module prefixes (e.g. `dall_e.`
/// for OpenAI's pickled modules).
#[derive(Debug, Clone, Default)]
pub struct Allow<'a> {
    /// Module prefixes whose every name is allowed (`"dall_e."` allows `dall_e.encoder.Encoder`).
    pub module_prefixes: &'a [&'a str],
}

/// Whether `module.name` is a type or function that only rebuilds data.
fn allowed(module: &str, name: &str, extra: &Allow) -> bool {
    if extra
        .module_prefixes
        .iter()
        .any(|p| module.starts_with(p) || format!("{module}.").starts_with(p))
    {
        return true;
    }
    match module {
        // Storage classes, dtypes, sizes and devices.
        "torch" => {
            name.ends_with("Storage")
                || matches!(name, "Size" | "device" | "dtype" | "Tensor")
                || TORCH_DTYPES.contains(&name)
        }
        "torch._utils" => name.starts_with("_rebuild_"),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch.storage" => matches!(name, "UntypedStorage" | "TypedStorage"),
        "torch.nn.parameter" => matches!(name, "Parameter" | "Buffer"),
        "collections" => matches!(name, "OrderedDict" | "defaultdict"),
        "builtins" | "__builtin__" => matches!(
            name,
            "set" | "frozenset" | "slice" | "complex" | "bytearray" | "float" | "int" | "bool"
        ),
        "_codecs" => name == "encode",
        // unilm / DeiT checkpoints keep the training arguments next to the weights.
        "argparse" => name == "Namespace",
        "numpy" | "numpy.core.multiarray" | "numpy._core.multiarray" => {
            matches!(name, "_reconstruct" | "scalar" | "dtype" | "ndarray")
        }
        // Module classes of pickled whole modules (`torch.save(module)`).
        m if m.starts_with("torch.nn.modules.") => true,
        _ => false,
    }
}

const TORCH_DTYPES: [&str; 14] = [
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long",
    "int32", "int", "int16", "int8", "uint8",
];

/// Check one pickle stream (the bytes of a `data.pkl`, or a file of consecutive pickles when
/// `max_pickles > 1`): `Ok` when every callable it names is allowed, else the offending one.
/// Scanning stops after `max_pickles` `STOP` opcodes (what follows may be raw tensor data).
pub fn check_pickle(bytes: &[u8], max_pickles: usize, extra: &Allow) -> Result<(), String> {
    let mut scan = Scan {
        bytes,
        pos: 0,
        memo: HashMap::new(),
        recent: Vec::new(),
    };
    let mut stops = 0;
    while scan.pos < bytes.len() && stops < max_pickles {
        let op = scan.byte()?;
        match op {
            b'.' => {
                stops += 1;
                scan.recent.clear();
            }
            // GLOBAL / INST: "module\nname\n".
            b'c' | b'i' => {
                let module = scan.line()?;
                let name = scan.line()?;
                check(&module, &name, extra)?;
                scan.push(None);
            }
            0x93 => {
                // STACK_GLOBAL: module and name are the two values pushed last.
                let n = scan.recent.len();
                let (module, name) =
                    match (n >= 2).then(|| (&scan.recent[n - 2], &scan.recent[n - 1])) {
                        Some((Some(m), Some(nm))) => (m.clone(), nm.clone()),
                        _ => return Err(
                            "the pickle builds a callable whose name cannot be read statically \
                             (STACK_GLOBAL without two string operands)"
                                .into(),
                        ),
                    };
                check(&module, &name, extra)?;
                scan.recent.truncate(n - 2);
                scan.push(None);
            }
            0x82..=0x84 => {
                return Err(
                    "the pickle uses the copyreg extension registry (EXT opcodes) to name a \
                     callable"
                        .into(),
                )
            }
            // Strings: remembered for STACK_GLOBAL.
            b'X' => {
                let n = scan.le(4)?;
                let s = scan.text(n)?;
                scan.push(Some(s));
            }
            0x8c => {
                let n = scan.le(1)?;
                let s = scan.text(n)?;
                scan.push(Some(s));
            }
            0x8d => {
                let n = scan.le(8)?;
                let s = scan.text(n)?;
                scan.push(Some(s));
            }
            b'V' => {
                let s = scan.line()?;
                scan.push(Some(s));
            }
            b'U' => {
                let n = scan.le(1)?;
                let s = scan.text(n)?;
                scan.push(Some(s));
            }
            b'T' => {
                let n = scan.le(4)?;
                let s = scan.text(n)?;
                scan.push(Some(s));
            }
            b'S' => {
                let s = scan.line()?;
                let s = s.trim_matches(|c| c == '\'' || c == '"').to_string();
                scan.push(Some(s));
            }
            // Memo: MEMOIZE, PUT, BINPUT, LONG_BINPUT store the top; GET variants push it.
            0x94 => {
                let idx = scan.memo.len();
                let top = scan.recent.last().cloned().flatten();
                scan.memo.insert(idx, top);
            }
            b'p' => {
                let idx = scan
                    .line()?
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| "bad PUT index")?;
                let top = scan.recent.last().cloned().flatten();
                scan.memo.insert(idx, top);
            }
            b'q' | b'r' => {
                let idx = scan.le(if op == b'q' { 1 } else { 4 })?;
                let top = scan.recent.last().cloned().flatten();
                scan.memo.insert(idx, top);
            }
            b'g' => {
                let idx = scan
                    .line()?
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| "bad GET index")?;
                let v = scan.memo.get(&idx).cloned().flatten();
                scan.push(v);
            }
            b'h' | b'j' => {
                let idx = scan.le(if op == b'h' { 1 } else { 4 })?;
                let v = scan.memo.get(&idx).cloned().flatten();
                scan.push(v);
            }
            // Opcodes with a fixed-size argument.
            b'K' | 0x80 => scan.skip(1)?.push_opaque(),
            b'M' => scan.skip(2)?.push_opaque(),
            b'J' => scan.skip(4)?.push_opaque(),
            b'G' => scan.skip(8)?.push_opaque(),
            0x95 => {
                scan.skip(8)?; // FRAME: no stack effect
            }
            // Opcodes with a length-prefixed argument.
            b'C' | 0x8a => {
                let n = scan.le(1)?;
                scan.skip(n)?.push_opaque();
            }
            b'B' | 0x8b => {
                let n = scan.le(4)?;
                scan.skip(n)?.push_opaque();
            }
            0x8e | 0x96 => {
                let n = scan.le(8)?;
                scan.skip(n)?.push_opaque();
            }
            // Newline-terminated arguments.
            b'I' | b'L' | b'F' | b'P' => {
                scan.line()?;
                scan.push(None);
            }
            // No argument.
            b'('
            | b'0'
            | b'1'
            | b'2'
            | b'N'
            | 0x88
            | 0x89
            | b']'
            | b'a'
            | b'e'
            | b'l'
            | b')'
            | b't'
            | 0x85..=0x87
            | b'}'
            | b'd'
            | b's'
            | b'u'
            | 0x8f..=0x91
            | b'R'
            | b'b'
            | b'o'
            | 0x81
            | 0x92
            | b'Q'
            | 0x97
            | 0x98 => scan.push(None),
            other => {
                return Err(format!(
                    "unknown pickle opcode 0x{other:02x} at byte {}",
                    scan.pos - 1
                ))
            }
        }
    }
    Ok(())
}

fn check(module: &str, name: &str, extra: &Allow) -> Result<(), String> {
    if allowed(module, name, extra) {
        Ok(())
    } else {
        Err(format!(
            "the pickle calls `{module}.{name}`, which is not a tensor or container type: refusing to \
             load it (a pickle naming it could run code when opened with Python)"
        ))
    }
}

struct Scan<'a> {
    bytes: &'a [u8],
    pos: usize,
    memo: HashMap<usize, Option<String>>,
    /// The values pushed so far that matter for STACK_GLOBAL (strings, or `None` for anything else);
    /// kept short: only the last two are ever read.
    recent: Vec<Option<String>>,
}

impl Scan<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or("the pickle ends in the middle of an opcode")?;
        self.pos += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<&mut Self, String> {
        if n > self.bytes.len() - self.pos {
            return Err(format!(
                "the pickle declares {n} bytes at byte {} but only {} remain",
                self.pos,
                self.bytes.len() - self.pos
            ));
        }
        self.pos += n;
        Ok(self)
    }

    fn push_opaque(&mut self) {
        self.push(None);
    }

    fn push(&mut self, v: Option<String>) {
        if self.recent.len() >= 8 {
            self.recent.remove(0);
        }
        self.recent.push(v);
    }

    /// A little-endian unsigned integer of `n` bytes.
    fn le(&mut self, n: usize) -> Result<usize, String> {
        let start = self.pos;
        self.skip(n)?;
        let mut v: u64 = 0;
        for (i, b) in self.bytes[start..start + n].iter().enumerate() {
            v |= (*b as u64) << (8 * i);
        }
        usize::try_from(v).map_err(|_| format!("length {v} does not fit in memory"))
    }

    fn text(&mut self, n: usize) -> Result<String, String> {
        let start = self.pos;
        self.skip(n)?;
        Ok(String::from_utf8_lossy(&self.bytes[start..start + n]).into_owned())
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("the pickle ends inside a text argument")?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &[u8]) -> String {
        check_pickle(bytes, 1, &Allow::default()).unwrap_err()
    }

    #[test]
    fn code_execution_is_refused_naming_the_callable() {
        // Protocol 0: GLOBAL os system, then REDUCE with ("echo pwned",).
        let e = err(b"cos\nsystem\n(S'echo pwned'\ntR.");
        assert!(e.contains("`os.system`"), "{e}");
        let e = err(b"cposix\nsystem\n(S'id'\ntR.");
        assert!(e.contains("`posix.system`"), "{e}");
        // Protocol 4: STACK_GLOBAL from memoized strings.
        let mut p = vec![0x80, 4, 0x95, 0, 0, 0, 0, 0, 0, 0, 0];
        for s in ["builtins", "eval"] {
            p.push(0x8c);
            p.push(s.len() as u8);
            p.extend_from_slice(s.as_bytes());
            p.push(0x94);
        }
        p.extend_from_slice(&[0x93, 0x8c, 2, b'1', b'+', 0x85, b'R', b'.']);
        let e = err(&p);
        assert!(e.contains("`builtins.eval`"), "{e}");
        // INST names a class and calls it too.
        let e = err(b"(isubprocess\nPopen\n.");
        assert!(e.contains("`subprocess.Popen`"), "{e}");
    }

    #[test]
    fn tensor_rebuilding_is_allowed() {
        let ok = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00ccollections\nOrderedDict\nq\x01)Rq\x02.";
        check_pickle(ok, 1, &Allow::default()).unwrap();
        // Memoized strings reused by BINGET.
        let mut p = vec![0x80, 4];
        for s in ["torch", "FloatStorage"] {
            p.push(0x8c);
            p.push(s.len() as u8);
            p.extend_from_slice(s.as_bytes());
            p.push(0x94);
        }
        p.extend_from_slice(&[0x93, 0x94, b'h', 0, b'h', 1, 0x93, b'.']);
        check_pickle(&p, 1, &Allow::default()).unwrap();
    }

    #[test]
    fn hostile_lengths_are_errors() {
        let e = err(&[0x80, 4, b'X', 0xff, 0xff, 0xff, 0x7f]);
        assert!(e.contains("only"), "{e}");
        let e = err(&[0x93, b'.']);
        assert!(e.contains("STACK_GLOBAL"), "{e}");
        let e = err(&[0x82, 1]);
        assert!(e.contains("extension"), "{e}");
    }
}
