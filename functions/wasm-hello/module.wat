;; wasm-hello: a WASI preview 1 command written by hand in WAT. It ignores its
;; input (JSON on stdin) and writes {"message":"hello from wasm"} to stdout.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; The answer, 29 bytes at offset 16.
  (data (i32.const 16) "{\"message\":\"hello from wasm\"}")
  (func (export "_start")
    ;; One iovec at offset 0: {ptr = 16, len = 29}; bytes written go to offset 8.
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 29))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
