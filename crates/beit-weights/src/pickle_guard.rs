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

use crate::allowlist::allowed;
pub use crate::allowlist::Allow;
use crate::scan::Scan;

/// Check one pickle stream (the bytes of a `data.pkl`, or a file of consecutive pickles when
/// `max_pickles > 1`): `Ok` when every callable it names is allowed, else the offending one.
/// Scanning stops after `max_pickles` `STOP` opcodes (what follows may be raw tensor data).
pub fn check_pickle(bytes: &[u8], max_pickles: usize, extra: &Allow) -> Result<(), String> {
    let mut scan = Scan::new(bytes);
    let mut stops = 0;
    while scan.pos < bytes.len() && stops < max_pickles {
        let op = scan.byte()?;
        if op == b'.' {
            stops += 1;
            scan.recent.clear();
            continue;
        }
        let known = callable_op(&mut scan, op, extra)?
            || string_op(&mut scan, op)?
            || memo_op(&mut scan, op)?
            || data_op(&mut scan, op)?;
        if !known {
            return Err(format!(
                "unknown pickle opcode 0x{op:02x} at byte {}",
                scan.pos - 1
            ));
        }
    }
    Ok(())
}

/// The opcodes that name a callable (`GLOBAL`, `INST`, `STACK_GLOBAL`, the `EXT` registry):
/// checked against the allowlist. `Ok(false)` for any other opcode.
fn callable_op(scan: &mut Scan, op: u8, extra: &Allow) -> Result<bool, String> {
    match op {
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
            let (module, name) = match (n >= 2).then(|| (&scan.recent[n - 2], &scan.recent[n - 1]))
            {
                Some((Some(m), Some(nm))) => (m.clone(), nm.clone()),
                _ => {
                    return Err(
                        "the pickle builds a callable whose name cannot be read statically \
                                (STACK_GLOBAL without two string operands)"
                            .into(),
                    )
                }
            };
            check(&module, &name, extra)?;
            scan.recent.truncate(n - 2);
            scan.push(None);
        }
        0x82..=0x84 => {
            return Err(
                "the pickle uses the copyreg extension registry (EXT opcodes) to name a callable"
                    .into(),
            )
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The string opcodes: their values are remembered for `STACK_GLOBAL`. `Ok(false)` for others.
fn string_op(scan: &mut Scan, op: u8) -> Result<bool, String> {
    let s = match op {
        b'X' | b'T' => {
            let n = scan.le(4)?;
            scan.text(n)?
        }
        0x8c | b'U' => {
            let n = scan.le(1)?;
            scan.text(n)?
        }
        0x8d => {
            let n = scan.le(8)?;
            scan.text(n)?
        }
        b'V' => scan.line()?,
        b'S' => {
            let s = scan.line()?;
            s.trim_matches(|c| c == '\'' || c == '"').to_string()
        }
        _ => return Ok(false),
    };
    scan.push(Some(s));
    Ok(true)
}

/// The memo opcodes: `MEMOIZE`, `PUT`, `BINPUT`, `LONG_BINPUT` store the top; the `GET`
/// variants push it. `Ok(false)` for others.
fn memo_op(scan: &mut Scan, op: u8) -> Result<bool, String> {
    let put = match op {
        0x94 => Some(scan.memo.len()),
        b'p' => Some(
            scan.line()?
                .trim()
                .parse::<usize>()
                .map_err(|_| "bad PUT index")?,
        ),
        b'q' | b'r' => Some(scan.le(if op == b'q' { 1 } else { 4 })?),
        b'g' => {
            let idx = scan
                .line()?
                .trim()
                .parse::<usize>()
                .map_err(|_| "bad GET index")?;
            return get(scan, idx);
        }
        b'h' | b'j' => {
            let idx = scan.le(if op == b'h' { 1 } else { 4 })?;
            return get(scan, idx);
        }
        _ => None,
    };
    let Some(idx) = put else { return Ok(false) };
    let top = scan.recent.last().cloned().flatten();
    scan.memo.insert(idx, top);
    Ok(true)
}

/// Push the memo entry `idx` (a `GET`).
fn get(scan: &mut Scan, idx: usize) -> Result<bool, String> {
    let v = scan.memo.get(&idx).cloned().flatten();
    scan.push(v);
    Ok(true)
}

/// The opcodes that only move data: fixed-size, length-prefixed, newline-terminated or no
/// argument. `Ok(false)` for others.
fn data_op(scan: &mut Scan, op: u8) -> Result<bool, String> {
    match op {
        // Fixed-size argument.
        b'K' | 0x80 => scan.skip(1)?.push_opaque(),
        b'M' => scan.skip(2)?.push_opaque(),
        b'J' => scan.skip(4)?.push_opaque(),
        b'G' => scan.skip(8)?.push_opaque(),
        0x95 => {
            scan.skip(8)?; // FRAME: no stack effect
        }
        // Length-prefixed argument.
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
        // Newline-terminated argument.
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
        _ => return Ok(false),
    }
    Ok(true)
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
