//! The CPU's floating-point mode for training: subnormal numbers flushed to zero.
//!
//! As training sharpens attention, softmax outputs and the gradients through them fall below
//! f32's normal range (1.2e-38); the CPU computes with such subnormal numbers in microcode, many
//! times slower, and a CPU fine-tune slowed about threefold within its first epochs. Flushing
//! them to zero (what `torch.set_flush_denormal(True)` does) changes no result a model can tell:
//! each such value is within 1.2e-38 of zero. GPUs are unaffected (CUDA kernels flush or handle
//! them in hardware).

/// Flushes subnormal results and inputs to zero on this thread and on every thread it starts
/// afterwards (threads inherit the floating-point mode on Linux: libtorch's pool, started at
/// the first parallel operation, does). Call it first in `main`. Returns whether the CPU has
/// the mode (x86-64 and AArch64 do; elsewhere nothing changes).
pub fn flush_subnormals() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // MXCSR: FTZ (bit 15) flushes results, DAZ (bit 6) reads subnormal inputs as zero.
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr/ldmxcsr only read and write the SSE control register; the bits set
        // are mode bits, not exception unmasks.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
            csr |= 0x8040;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
        }
        true
    }
    #[cfg(target_arch = "aarch64")]
    {
        // FPCR.FZ (bit 24): subnormal inputs and results are flushed to zero.
        // SAFETY: only the floating-point control register's flush bit changes.
        unsafe {
            let mut fpcr: u64;
            std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
            fpcr |= 1 << 24;
            std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
        }
        true
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnormal_results_become_zero_here_and_in_threads_started_after() {
        let tiny = std::hint::black_box(1.0e-30f32);
        let product = |x: f32| std::hint::black_box(x) * std::hint::black_box(1.0e-10f32);
        // Run in a fresh thread so the mode does not leak into other tests.
        std::thread::spawn(move || {
            assert!(product(tiny) > 0.0, "subnormal before");
            if flush_subnormals() {
                assert_eq!(product(tiny), 0.0, "flushed on this thread");
                let child = std::thread::spawn(move || product(tiny)).join().unwrap();
                assert_eq!(child, 0.0, "flushed on a thread started after");
                let t = tch::Tensor::from_slice(&[tiny]) * 1.0e-10;
                assert_eq!(t.double_value(&[0]), 0.0, "flushed in libtorch");
            }
        })
        .join()
        .unwrap();
    }
}
