//! What a pickle may name: the built-in allowlist of tensor-rebuilding and container types, and
//! the extra module prefixes a reader adds ([`Allow`]).

/// What a pickle may name, beyond the built-in allowlist: extra module prefixes (e.g. `dall_e.`
/// for OpenAI's pickled modules).
#[derive(Debug, Clone, Default)]
pub struct Allow<'a> {
    /// Module prefixes whose every name is allowed (`"dall_e."` allows `dall_e.encoder.Encoder`).
    pub module_prefixes: &'a [&'a str],
}

/// Whether `module.name` is a type or function that only rebuilds data.
pub(crate) fn allowed(module: &str, name: &str, extra: &Allow) -> bool {
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
