//! Process-wide memory settings for frame-rate work. Every frame allocates frame-sized buffers
//! (the decoded image, the density map, the masks, the owner map) and frees them again. glibc
//! serves allocations above its mmap threshold (128 KiB at start, adjusted up to 32 MiB) with
//! fresh mappings: each frame then faulted in and zeroed every page of them again (about a
//! sixth of a 1080p frame's CPU time in a profile). [`reuse_frame_buffers`] keeps such blocks
//! in the heap, so the next frame reuses the same pages.

/// Largest single allocation kept in the heap rather than mapped (a 2592x1944 frame's f32 map
/// is 20 MiB; 64 MiB leaves room).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const KEEP_BELOW: libc::c_int = 64 << 20;

/// Keeps frame-sized blocks in the heap between frames (glibc: `M_MMAP_THRESHOLD`, and a trim
/// threshold above it so the freed pages are not handed back after every frame). Elsewhere a
/// no-op. Returns whether the settings took.
pub fn reuse_frame_buffers() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's thresholds; it is called before the
        // process starts its worker threads.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, KEEP_BELOW) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * KEEP_BELOW) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn frame_buffers_stay_in_the_heap_on_glibc() {
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        assert_eq!(super::reuse_frame_buffers(), glibc);
    }
}
