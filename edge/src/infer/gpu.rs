//! What the TensorRT engine cache is keyed on besides the model: the TensorRT library's
//! version (`getInferLibVersion` of libnvinfer) and the GPU's compute capability (the CUDA
//! driver API of libcuda). Both are read from the libraries the TensorRT provider itself
//! loads, at run time; a machine without them gets a clear error and the provider is skipped.

use std::ffi::c_int;

/// Sonames tried for TensorRT, newest first (JetPack 6 ships TensorRT 10).
const NVINFER: [&str; 4] = [
    "libnvinfer.so.10",
    "libnvinfer.so.9",
    "libnvinfer.so.8",
    "libnvinfer.so",
];
const CUDA: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

fn load(names: &[&str]) -> Result<libloading::Library, String> {
    let mut last = String::new();
    for n in names {
        // SAFETY: loading NVIDIA's own libraries, the same ones the TensorRT provider loads.
        match unsafe { libloading::Library::new(*n) } {
            Ok(l) => return Ok(l),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "none of {} could be loaded ({last})",
        names.join(", ")
    ))
}

/// Splits TensorRT's version number: `major * 1000 + minor * 100 + patch` before TensorRT 10,
/// `major * 10000 + minor * 100 + patch` from 10 on.
pub fn tensorrt_version_string(v: i32) -> String {
    if v >= 100_000 {
        format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, v / 100 % 10, v % 100)
    }
}

/// The TensorRT version, e.g. `10.3.0`.
pub fn tensorrt_version() -> Result<String, String> {
    let lib = load(&NVINFER).map_err(|e| format!("TensorRT: {e}"))?;
    // SAFETY: `getInferLibVersion` is TensorRT's C entry point `int32_t getInferLibVersion()`.
    let v = unsafe {
        let f: libloading::Symbol<unsafe extern "C" fn() -> i32> =
            lib.get(b"getInferLibVersion")
                .map_err(|e| format!("TensorRT: no getInferLibVersion ({e})"))?;
        f()
    };
    Ok(tensorrt_version_string(v))
}

/// The compute capability of CUDA device `device`, e.g. `8.7`.
pub fn compute_capability(device: i32) -> Result<String, String> {
    let lib = load(&CUDA).map_err(|e| format!("CUDA driver: {e}"))?;
    const MAJOR: c_int = 75; // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    const MINOR: c_int = 76; // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
                             // SAFETY: the CUDA driver API's C functions with their documented signatures
                             // (cuInit, cuDeviceGet, cuDeviceGetAttribute); every out-pointer is a live local.
    unsafe {
        let init: libloading::Symbol<unsafe extern "C" fn(u32) -> c_int> =
            lib.get(b"cuInit").map_err(|e| e.to_string())?;
        let get: libloading::Symbol<unsafe extern "C" fn(*mut c_int, c_int) -> c_int> =
            lib.get(b"cuDeviceGet").map_err(|e| e.to_string())?;
        let attr: libloading::Symbol<unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int> = lib
            .get(b"cuDeviceGetAttribute")
            .map_err(|e| e.to_string())?;
        let r = init(0);
        if r != 0 {
            return Err(format!(
                "CUDA driver: cuInit failed (error {r}): no usable GPU"
            ));
        }
        let mut dev: c_int = 0;
        let r = get(&mut dev, device);
        if r != 0 {
            return Err(format!("CUDA driver: no device {device} (error {r})"));
        }
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        if attr(&mut major, MAJOR, dev) != 0 || attr(&mut minor, MINOR, dev) != 0 {
            return Err(format!(
                "CUDA driver: cannot read device {device}'s compute capability"
            ));
        }
        Ok(format!("{major}.{minor}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorrt_version_numbers_of_both_schemes() {
        assert_eq!(tensorrt_version_string(100300), "10.3.0");
        assert_eq!(tensorrt_version_string(101302), "10.13.2");
        assert_eq!(tensorrt_version_string(8601), "8.6.1");
        assert_eq!(tensorrt_version_string(8510), "8.5.10");
    }

    #[test]
    fn missing_libraries_are_reported_by_name() {
        // This machine may or may not have a GPU; either answer must be a clear one.
        match tensorrt_version() {
            Ok(v) => assert!(v.split('.').count() == 3, "{v}"),
            Err(e) => assert!(e.contains("libnvinfer"), "{e}"),
        }
        match compute_capability(0) {
            Ok(cc) => assert!(cc.contains('.'), "{cc}"),
            Err(e) => assert!(e.contains("CUDA"), "{e}"),
        }
    }
}
