//! The loaded function: a shared library built with fnrt-sdk's `export!`, reached through its
//! C ABI (version 1):
//!
//! ```text
//! fnrt_abi_version() -> u32                                          // 1
//! fnrt_call(input: *const u8, input_len: usize, output_len: *mut usize) -> *mut u8
//! fnrt_free(ptr: *mut u8, len: usize)                                // frees fnrt_call's answer
//! ```
//!
//! This is the only module that touches `unsafe`: the loading and the calls.

use std::path::Path;

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

/// The C ABI version this runtime speaks (fnrt-sdk's `__private::ABI_VERSION`).
pub(crate) const ABI_VERSION: u32 = 1;

type AbiVersionFn = unsafe extern "C" fn() -> u32;
pub(crate) type CallFn = unsafe extern "C" fn(*const u8, usize, *mut usize) -> *mut u8;
pub(crate) type FreeFn = unsafe extern "C" fn(*mut u8, usize);

/// Why a library could not be used: `kind` is the answer's `details.type`.
#[derive(Debug)]
pub(crate) struct LoadError {
    pub(crate) kind: &'static str,
    pub(crate) message: String,
}

/// The function's two entry points. The library they live in is never unloaded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Function {
    call: CallFn,
    free: FreeFn,
}

impl Function {
    /// Loads the library at `path` (which must contain a `/`, so no search path is consulted),
    /// checks its ABI version and resolves its entry points. Runs the library's initialisers.
    #[allow(unsafe_code)]
    pub(crate) fn load(path: &Path) -> Result<Function, LoadError> {
        // RTLD_NOW: an unresolvable symbol fails here (422) rather than in the middle of a run.
        // SAFETY: loading runs the library's initialisers, which is running the function's code:
        // what /init is for. The instance exists for this one function, and the library is never
        // unloaded (leaked below), so no termination routine runs while its code is in use.
        let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| LoadError {
            kind: "LoadError",
            // The source is dlerror()'s text (`./function/function.so: invalid ELF header`).
            message: match std::error::Error::source(&e) {
                Some(why) => format!("cannot load the function's library: {why}"),
                None => format!("cannot load the function's library: {e}"),
            },
        })?;
        // Leaked: the fn pointers below must stay valid for the life of the process.
        let library: &'static Library = Box::leak(Box::new(library));

        let not_ours = |what: &str| LoadError {
            kind: "AbiError",
            message: format!(
                "the library {what}: it was not built with fnrt-sdk's export! macro, or for another \
                 version of its C ABI (this runtime speaks version {ABI_VERSION})"
            ),
        };
        // SAFETY: `fnrt_abi_version` is the name fnrt-sdk's `export!` gives to a function of
        // exactly this type; a library that uses the name for something else is not a function
        // library at all, which the controller (who built it with the SDK) rules out.
        let abi_version = unsafe { library.get::<AbiVersionFn>(b"fnrt_abi_version\0") }
            .map_err(|_| not_ours("does not export fnrt_abi_version"))?;
        // SAFETY: the type was just resolved as above; the function takes nothing and returns a u32.
        let version = unsafe { abi_version() };
        if version != ABI_VERSION {
            return Err(not_ours(&format!("has C ABI version {version}")));
        }
        // SAFETY: in ABI version 1 these names have exactly these types (fnrt-sdk's `export!`).
        let call = unsafe { library.get::<CallFn>(b"fnrt_call\0") }.map(|symbol| *symbol);
        // SAFETY: as above.
        let free = unsafe { library.get::<FreeFn>(b"fnrt_free\0") }.map(|symbol| *symbol);
        match (call, free) {
            (Ok(call), Ok(free)) => Ok(Function { call, free }),
            _ => Err(LoadError {
                kind: "SymbolError",
                message: "the library has fnrt_abi_version but lacks fnrt_call or fnrt_free".to_owned(),
            }),
        }
    }

    /// A function from raw entry points (tests stand in for a library with these).
    #[cfg(test)]
    pub(crate) fn from_raw(call: CallFn, free: FreeFn) -> Function {
        Function { call, free }
    }

    /// Calls the function with `input` (`{"params":…,"context":…}`) and returns its answer bytes
    /// (empty if it returned no buffer). Blocks for as long as the function runs.
    #[allow(unsafe_code)]
    pub(crate) fn call(&self, input: &[u8]) -> Vec<u8> {
        let mut len = 0usize;
        // SAFETY: ABI version 1: `input` is readable for `input.len()` bytes for the whole call and
        // `len` is a valid place for the answer's length. The SDK catches panics, so nothing
        // unwinds into this frame (an unwind through extern "C" aborts the process anyway).
        let ptr = unsafe { (self.call)(input.as_ptr(), input.len(), &mut len) };
        if ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: the function returned `len` initialised bytes at `ptr`, ours until `free`.
        let answer = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
        // SAFETY: the pointer and length this library's `fnrt_call` returned, released once.
        unsafe { (self.free)(ptr, len) };
        answer
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn a_file_that_is_not_a_library() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("function.so");
        std::fs::write(&path, b"not a shared object").unwrap();
        let error = Function::load(&path).unwrap_err();
        assert_eq!(error.kind, "LoadError");
        assert!(
            error.message.starts_with("cannot load the function's library: "),
            "{}",
            error.message
        );
    }

    #[test]
    fn a_library_without_the_abi() {
        // Any shared library not built with the SDK will do; libm is harmless to load.
        let candidates = [
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/usr/lib/x86_64-linux-gnu/libm.so.6",
            "/lib64/libm.so.6",
        ];
        let Some(libm) = candidates.iter().map(PathBuf::from).find(|p| p.exists()) else {
            eprintln!("no libm found; skipped");
            return;
        };
        let error = Function::load(&libm).unwrap_err();
        assert_eq!(error.kind, "AbiError");
        assert!(
            error.message.contains("not built with fnrt-sdk's export! macro"),
            "{}",
            error.message
        );
    }
}
