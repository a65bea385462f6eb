//! A bounds-checked cursor over a pickle stream, remembering the values pushed last (the operands
//! a `STACK_GLOBAL` may take its module and name from).

use std::collections::HashMap;

/// Where the scan is in the stream, and what it remembers of the values pushed.
pub(crate) struct Scan<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) pos: usize,
    pub(crate) memo: HashMap<usize, Option<String>>,
    /// The values pushed so far that matter for STACK_GLOBAL (strings, or `None` for anything else);
    /// kept short: only the last two are ever read.
    pub(crate) recent: Vec<Option<String>>,
}

impl<'a> Scan<'a> {
    /// A scan from the first byte of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Scan {
            bytes,
            pos: 0,
            memo: HashMap::new(),
            recent: Vec::new(),
        }
    }

    pub(crate) fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or("the pickle ends in the middle of an opcode")?;
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn skip(&mut self, n: usize) -> Result<&mut Self, String> {
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

    pub(crate) fn push_opaque(&mut self) {
        self.push(None);
    }

    pub(crate) fn push(&mut self, v: Option<String>) {
        if self.recent.len() >= 8 {
            self.recent.remove(0);
        }
        self.recent.push(v);
    }

    /// A little-endian unsigned integer of `n` bytes.
    pub(crate) fn le(&mut self, n: usize) -> Result<usize, String> {
        let start = self.pos;
        self.skip(n)?;
        let mut v: u64 = 0;
        for (i, b) in self.bytes[start..start + n].iter().enumerate() {
            v |= (*b as u64) << (8 * i);
        }
        usize::try_from(v).map_err(|_| format!("length {v} does not fit in memory"))
    }

    pub(crate) fn text(&mut self, n: usize) -> Result<String, String> {
        let start = self.pos;
        self.skip(n)?;
        Ok(String::from_utf8_lossy(&self.bytes[start..start + n]).into_owned())
    }

    pub(crate) fn line(&mut self) -> Result<String, String> {
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
