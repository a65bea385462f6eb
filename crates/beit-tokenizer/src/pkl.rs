//! Reading OpenAI's published `encoder.pkl` / `decoder.pkl` without executing any code.
//!
//! Those files are whole `nn.Module`s saved with `torch.save(module)`, not state dicts, so
//! `candle::pickle::read_all` (which expects a dict at the top) finds nothing in them. The pickle
//! itself only *describes* objects: we run candle's pickle virtual machine ([`candle::pickle::Stack`],
//! which builds an inert object tree and never imports or calls anything), walk the module tree
//! through each module's `_parameters` / `_buffers` / `_modules` entries to rebuild the state-dict
//! names (`blocks.group_1.block_1.res_path.conv_1.w`, ...), and read the tensor bytes from the
//! file's storages. Both layouts of `torch.save` are read: the zip archive (PyTorch >= 1.6) and the
//! legacy sequence of pickles followed by raw storages.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use candle::pickle::{Object, Stack};
use candle::{DType, Device, Tensor};

use crate::error::{Result, TokenizerError};

/// Read the parameters (and persistent buffers) of a pickled whole module, by state-dict name,
/// as CPU tensors. Works on `dall_e`'s `encoder.pkl` and `decoder.pkl`.
pub fn load_dalle_pkl(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| TokenizerError::io(path, e))?;
    parse_dalle_pkl(&bytes, path)
}

/// [`load_dalle_pkl`] on bytes already in memory; `path` only names them in errors.
pub fn parse_dalle_pkl(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    let err = |reason: String| TokenizerError::Pickle {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.starts_with(b"PK") {
        read_zip(bytes, &err)
    } else {
        read_legacy(bytes, &err)
    }
}

type ErrFn<'a> = &'a dyn Fn(String) -> TokenizerError;

/// Largest `data.pkl` read (the DALL-E encoder's is about 10 KB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Refuse pickles that name anything but tensor, container and module types (`dall_e.*` and
/// `torch.nn.*` modules included): a pickle naming `os.system` or `builtins.eval` is an attack on
/// whoever opens it with Python, and is reported with the callable's name.
fn guard(bytes: &[u8], pickles: usize, err: ErrFn) -> Result<()> {
    let allow = beit_weights::Allow {
        module_prefixes: &["dall_e."],
    };
    beit_weights::check_pickle(bytes, pickles, &allow).map_err(err)
}

/// A tensor found in the object tree: which storage, its dtype and its view.
struct TensorRef {
    name: String,
    storage_key: String,
    dtype: DType,
    dims: Vec<usize>,
    contiguous: bool,
    offset_bytes: usize,
}

fn read_zip(bytes: &[u8], err: ErrFn) -> Result<HashMap<String, Tensor>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| err(format!("not a readable zip archive: {e}")))?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .ok_or_else(|| err("no `data.pkl` in the zip archive".into()))?;
    let data_dir = pkl_name.trim_end_matches("data.pkl").to_string() + "data/";
    let root = {
        let mut entry = zip
            .by_name(&pkl_name)
            .map_err(|e| err(format!("{pkl_name}: {e}")))?;
        let mut pkl = Vec::new();
        (&mut entry)
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut pkl)
            .map_err(|e| err(format!("{pkl_name}: {e}")))?;
        guard(&pkl, 1, err)?;
        unpickle(&mut Cursor::new(pkl), err)?
    };
    let refs = collect_tensors(root, err)?;
    let mut out = HashMap::new();
    for r in refs {
        let entry_name = format!("{data_dir}{}", r.storage_key);
        let mut storage = Vec::new();
        zip.by_name(&entry_name)
            .map_err(|e| err(format!("tensor `{}`: storage {entry_name}: {e}", r.name)))?
            .read_to_end(&mut storage)
            .map_err(|e| err(format!("tensor `{}`: reading {entry_name}: {e}", r.name)))?;
        out.insert(r.name.clone(), materialise(&r, &storage, err)?);
    }
    Ok(out)
}

/// The pre-1.6 layout: pickles of (magic, protocol, sys_info, object, storage keys), then for each
/// storage key in that order an 8-byte little-endian element count and the raw elements.
fn read_legacy(bytes: &[u8], err: ErrFn) -> Result<HashMap<String, Tensor>> {
    // The first pickle is the magic number 0x1950a86a20f9469cfc6c, a 10-byte LONG1 (protocol 2).
    // Compare its bytes instead of unpickling it: it does not fit in an i64.
    const MAGIC_PICKLE: [u8; 15] = [
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
    ];
    if !bytes.starts_with(&MAGIC_PICKLE) {
        return Err(err(
            "neither a zip archive nor a legacy torch.save file (bad magic number)".into(),
        ));
    }
    // magic, protocol, sys_info, the module, the storage keys; raw storages follow.
    guard(bytes, 5, err)?;
    let mut cur = Cursor::new(bytes);
    cur.set_position(MAGIC_PICKLE.len() as u64);
    let _protocol = unpickle(&mut cur, err)?;
    let _sys_info = unpickle(&mut cur, err)?;
    let root = unpickle(&mut cur, err)?;
    let keys = match unpickle(&mut cur, err)? {
        Object::List(keys) => keys
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|o| err(format!("bad storage key {o:?}")))
            })
            .collect::<Result<Vec<_>>>()?,
        other => {
            return Err(err(format!(
                "expected the list of storage keys, found {other:?}"
            )))
        }
    };
    let refs = collect_tensors(root, err)?;
    let elem_size: HashMap<&str, usize> = refs
        .iter()
        .map(|r| (r.storage_key.as_str(), r.dtype.size_in_bytes()))
        .collect();
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    for key in &keys {
        let mut n = [0u8; 8];
        cur.read_exact(&mut n)
            .map_err(|e| err(format!("storage {key}: truncated header: {e}")))?;
        let numel = u64::from_le_bytes(n) as usize;
        let size = elem_size.get(key.as_str()).copied().ok_or_else(|| {
            err(format!(
                "storage {key} is not used by any tensor; cannot tell its element size"
            ))
        })?;
        // The declared size must fit in what is left of the file before anything is allocated.
        let remaining = bytes.len() as u64 - cur.position();
        let len = (numel as u64)
            .checked_mul(size as u64)
            .filter(|&l| l <= remaining)
            .ok_or_else(|| {
                err(format!(
                    "storage {key}: declares {numel} elements of {size} bytes but only {remaining} \
                     bytes remain"
                ))
            })?;
        let mut data = vec![0u8; len as usize];
        cur.read_exact(&mut data)
            .map_err(|e| err(format!("storage {key}: truncated data: {e}")))?;
        storages.insert(key.clone(), data);
    }
    let mut out = HashMap::new();
    for r in refs {
        let storage = storages.get(&r.storage_key).ok_or_else(|| {
            err(format!(
                "tensor `{}`: storage {} missing",
                r.name, r.storage_key
            ))
        })?;
        out.insert(r.name.clone(), materialise(&r, storage, err)?);
    }
    Ok(out)
}

fn unpickle<R: std::io::BufRead>(r: &mut R, err: ErrFn) -> Result<Object> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .map_err(|e| err(format!("cannot parse the pickle: {e}")))?;
    stack
        .finalize()
        .map_err(|e| err(format!("cannot parse the pickle: {e}")))
}

/// Copy the tensor's bytes out of its storage.
fn materialise(r: &TensorRef, storage: &[u8], err: ErrFn) -> Result<Tensor> {
    if !r.contiguous {
        return Err(err(format!("tensor `{}` is not contiguous", r.name)));
    }
    let end = r
        .dims
        .iter()
        .try_fold(r.dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
        .and_then(|len| r.offset_bytes.checked_add(len));
    let Some(end) = end.filter(|&e| e <= storage.len()) else {
        return Err(err(format!(
            "tensor `{}` of shape {:?} at byte {} does not fit in its storage of {} bytes",
            r.name,
            r.dims,
            r.offset_bytes,
            storage.len()
        )));
    };
    Ok(Tensor::from_raw_buffer(
        &storage[r.offset_bytes..end],
        r.dtype,
        &r.dims,
        &Device::Cpu,
    )?)
}

/// Walk a module tree and list its parameters and buffers with their state-dict names.
fn collect_tensors(root: Object, err: ErrFn) -> Result<Vec<TensorRef>> {
    let mut out = Vec::new();
    walk_module(root, "", &mut out, err)?;
    if out.is_empty() {
        return Err(err(
            "no module parameters found (expected a pickled torch.nn.Module)".into(),
        ));
    }
    Ok(out)
}

/// The attribute dict of a pickled object: `BUILD(obj, state)` with a dict state.
fn module_state(obj: Object) -> Option<Vec<(Object, Object)>> {
    match obj {
        Object::Build { args, .. } => match *args {
            Object::Dict(d) => Some(d),
            // `__setstate__` states may come as (dict, slots); take the dict.
            Object::Tuple(mut t) if !t.is_empty() => match t.remove(0) {
                Object::Dict(d) => Some(d),
                _ => None,
            },
            _ => None,
        },
        Object::Dict(d) => Some(d),
        _ => None,
    }
}

fn walk_module(obj: Object, prefix: &str, out: &mut Vec<TensorRef>, err: ErrFn) -> Result<()> {
    let Some(state) = module_state(obj) else {
        return Ok(());
    };
    for (key, value) in state {
        let Object::Unicode(key) = key else { continue };
        match key.as_str() {
            "_parameters" | "_buffers" => {
                let Object::Dict(entries) = value else {
                    continue;
                };
                for (name, t) in entries {
                    let Object::Unicode(name) = name else {
                        continue;
                    };
                    if t == Object::None {
                        continue;
                    }
                    let full = format!("{prefix}{name}");
                    out.push(tensor_ref(t, full, err)?);
                }
            }
            "_modules" => {
                let Object::Dict(entries) = value else {
                    continue;
                };
                for (name, m) in entries {
                    let Object::Unicode(name) = name else {
                        continue;
                    };
                    walk_module(m, &format!("{prefix}{name}."), out, err)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn tensor_ref(obj: Object, name: String, err: ErrFn) -> Result<TensorRef> {
    let info = obj
        .into_tensor_info(Object::Unicode(name.clone()), Path::new(""))
        .map_err(|e| err(format!("tensor `{name}`: {e}")))?
        .ok_or_else(|| err(format!("`{name}` is not a tensor this reader understands")))?;
    // `into_tensor_info` joins the storage key to the (empty) directory: "/<key>".
    let storage_key = info.path.trim_start_matches('/').to_string();
    Ok(TensorRef {
        name,
        storage_key,
        dtype: info.dtype,
        dims: info.layout.dims().to_vec(),
        contiguous: info.layout.is_contiguous(),
        offset_bytes: info.layout.start_offset(),
    })
}
