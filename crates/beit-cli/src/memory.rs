//! Process-wide allocator settings for tensor workloads.

/// Keep freed tensor buffers in the heap instead of returning them to the kernel.
///
/// glibc serves blocks above `M_MMAP_THRESHOLD` with a fresh `mmap` and unmaps them on `free`, and
/// trims the heap top beyond `M_TRIM_THRESHOLD`: every activation and gradient of a step (up to
/// ~20 MB each for ViT-B at batch 8) then costs page faults and kernel page clearing, measured at
/// about 10% of a training step (docs/performance.md). Raising both thresholds makes the buffers
/// of one step reuse those of the previous one. Process-wide; a no-op outside glibc.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator parameters; called before the big allocations.
        unsafe {
            // 32 MiB is glibc's largest accepted mmap threshold on 64-bit; never trim the heap.
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Apply [`keep_freed_memory`] unless the environment sets `BEIT_KEEP_FREED_MEMORY=0` (to measure
/// what it gains). Call once at start-up, before any tensor is allocated.
pub fn configure() {
    if std::env::var("BEIT_KEEP_FREED_MEMORY").map_or(true, |v| v.trim() != "0") {
        keep_freed_memory();
    }
}
