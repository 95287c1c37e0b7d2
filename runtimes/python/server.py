"""Python runtime server: runs one Python function for the controller.

The controller starts this file as a child process (or as a container's
entrypoint), specialises it with one function's code through `POST /init`,
then calls that function through `POST /run`. The wire protocol is
docs/runtime-protocol.md; this file implements it with the standard library
only (`socketserver` over a Unix socket), so it starts with nothing installed.

    python3 server.py --socket /DATA/instances/ID/runtime.sock

Layout:

- `Runtime` holds the state of this instance: the one function it serves, the
  one-init rule, the one-run-at-a-time lock, and the mapping of a Python
  exception to the protocol's error body (type, line, column, stack trace).
- `Handler` speaks HTTP/1.1 (keep-alive, bounded bodies, JSON everywhere,
  including its own error pages) and routes to `Runtime`.
- `main` parses `--socket`, removes a stale socket file and serves forever.

Connections are served by one thread each, so `GET /health` answers while a
run is in progress and a second, concurrent `POST /run` gets 409 BUSY.

stdout and stderr belong to the function (`print`); the server itself writes
nothing to stdout and only real problems to stderr, besides a run's
`log_marker` on both when the run ends. All a run wrote is in the pipes before
its answer. What a run's leftover threads or tasks write while a later run is in
progress is dropped (see "Late writes").
"""

import collections.abc
import contextvars
import functools
import gc
import importlib.util
import json
import linecache
import os
import re
import socket
import socketserver
import stat
import sys
import threading
import traceback
import types

# Request bodies larger than this are refused before they are read.
MAX_BODY_BYTES = 16 * 1024 * 1024

# The function's module is always imported under this name, whatever its file
# is called, so an entrypoint named like a stdlib module cannot shadow it.
MODULE_NAME = "function_main"

# Directory (relative to the working directory, the instance directory) where
# the function's code is written.
FUNCTION_DIR = "function"

# Beside FUNCTION_DIR: a package's installed dependencies.
DEPS_DIR = "deps"

# `[A-Za-z0-9_.-]{1,64}`; matched with fullmatch, so no trailing newline slips in.
ENTRYPOINT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# A /run's `log_marker`, written on both streams when the run ends; fullmatch too.
LOG_MARKER_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")

# The only variables of the runtime's own environment the function keeps.
INHERITED_ENV = ("PATH", "HOME", "LANG", "TMPDIR")

# Frames of this file are trimmed from the tracebacks shown to clients. Its
# code's own name for it: run from bytecode (server.pyc), __file__ names that.
SERVER_FILE = os.path.abspath(sys._getframe(0).f_code.co_filename)


class RequestError(Exception):
    """A non-200 answer decided deep inside a request (4xx with an error body)."""

    def __init__(self, status, code, message, details=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def error_body(code, message, details=None):
    error = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def encode_json(value):
    """Serialise to compact UTF-8 JSON; refuse NaN/Infinity (not JSON)."""
    # ensure_ascii=False keeps the body small; a lone surrogate then fails
    # here (UnicodeEncodeError) instead of producing JSON the controller refuses.
    text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8")


def clean_text(text):
    """Make a string safe to encode (lone surrogates become '?')."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _refuse_constant(name):
    # json.loads accepts NaN/Infinity by default; they are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw):
    """Parse a request body that must be a JSON object, or raise BAD_REQUEST."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(400, "BAD_REQUEST", f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RequestError(400, "BAD_REQUEST", "body must be a JSON object")
    return value


def _field(body, name, kinds, what, required=False, default=None):
    """Read one field of a request body, checking its JSON type."""
    if name not in body:
        if required:
            raise RequestError(400, "BAD_REQUEST", f"'{name}' is required")
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    # bool is a subclass of int in Python but not a number in JSON.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RequestError(400, "BAD_REQUEST", f"'{name}' must be {what}")
    return value


def _byte_to_char_column(filename, lineno, byte_offset):
    """FrameSummary.colno counts UTF-8 bytes; clients want characters."""
    line = linecache.getline(filename, lineno)
    if not line:
        return byte_offset
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", "replace"))


class Runtime:
    """The state of this instance: the one function it serves."""

    def __init__(self, base_env, package_dir=None):
        # The runtime's own environment at start-up; only INHERITED_ENV of it
        # reaches the function.
        self.base_env = base_env
        # Held for the whole of an /init, so a concurrent one is refused.
        self._init_lock = threading.Lock()
        # Held for the whole of a /run: one run at a time (409 BUSY).
        self._run_lock = threading.Lock()
        # How many runs have started: each run's sequence number (see _RUN).
        self._run_count = 0
        # An /init that got past validation consumes the instance's one init,
        # even if the code then failed to load (its top level may have run).
        self.init_attempted = False
        # The function's handler once /init succeeded; None before.
        self.handler = None
        # Where the controller puts a multi-file function's files (`function/`
        # beside the socket) before an /init with "package": true.
        self.package_dir = package_dir
        instance_dir = os.getcwd()
        # Absolute, so frames of the function's file are recognised by name.
        self.function_dir = os.path.join(instance_dir, FUNCTION_DIR)
        # The function's file once /init began: errors are located in it.
        self.entry_path = None
        # (host path, replacement) pairs applied to stack traces and messages
        # so no host path leaks; longest first.
        self._path_map = self._build_path_map(instance_dir, None)

    @property
    def initialized(self):
        return self.handler is not None

    # --- /health ------------------------------------------------------------

    def health(self):
        return {
            "status": "ok",
            "language": "python",
            "runtime_version": "{}.{}.{}".format(*sys.version_info[:3]),
            "initialized": self.initialized,
        }

    # --- /init --------------------------------------------------------------

    def init(self, body):
        entrypoint = _field(body, "entrypoint", str, "a string", required=True)
        code = _field(body, "code", str, "a string", required=True)
        handler_name = _field(body, "handler", str, "a string", default="handler")
        env = _field(body, "env", dict, "an object of strings", default={})
        package = _field(body, "package", bool, "a boolean", default=False)
        # Informational; checked so a confused caller hears about it.
        _field(body, "language_title", str, "a string")
        _field(body, "version", int, "an integer")

        if package:
            parts = entrypoint.split("/")
            if not all(ENTRYPOINT_RE.fullmatch(p) and p not in (".", "..") for p in parts):
                raise RequestError(400, "BAD_REQUEST", "'entrypoint' must be a relative path of [A-Za-z0-9_.-] parts")
            if not all(p.isidentifier() for p in parts[:-1] + [parts[-1][:-3]]):
                raise RequestError(400, "BAD_REQUEST", "'entrypoint' must be importable: its directories and name identifiers")
            if self.package_dir is None or not os.path.isfile(os.path.join(self.package_dir, entrypoint)):
                raise RequestError(400, "BAD_REQUEST", f"the package's '{entrypoint}' is not in place")
        elif not ENTRYPOINT_RE.fullmatch(entrypoint) or entrypoint in (".", ".."):
            raise RequestError(400, "BAD_REQUEST", "'entrypoint' must be a plain file name matching [A-Za-z0-9_.-]{1,64}")
        if not entrypoint.endswith(".py"):
            raise RequestError(400, "BAD_REQUEST", "'entrypoint' must end in .py")
        if not handler_name:
            raise RequestError(400, "BAD_REQUEST", "'handler' must not be empty")
        for key, value in env.items():
            if not isinstance(value, str):
                raise RequestError(400, "BAD_REQUEST", f"env value of '{key}' must be a string")
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise RequestError(400, "BAD_REQUEST", "env names must be non-empty without '=' or NUL, values without NUL")
        try:
            source = code.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, "BAD_REQUEST", "'code' is not valid Unicode") from None

        if not self._init_lock.acquire(blocking=False):
            raise RequestError(409, "ALREADY_INITIALIZED", "an /init is already in progress on this instance")
        try:
            if self.init_attempted:
                state = "initialized" if self.initialized else "failed to initialize"
                raise RequestError(409, "ALREADY_INITIALIZED", f"this instance already {state}; it loads one function once")
            self.init_attempted = True
            try:
                if package:
                    self._load_package(entrypoint, handler_name, env)
                else:
                    self._load(entrypoint, source, handler_name, env)
            finally:
                _flush_std_streams()
        finally:
            self._init_lock.release()
        return {"status": "initialized"}

    def _load(self, entrypoint, source, handler_name, env):
        self.entry_path = os.path.join(self.function_dir, entrypoint)
        self._path_map = self._build_path_map(os.getcwd(), self.entry_path)

        try:
            os.makedirs(self.function_dir, exist_ok=True)
            # O_NOFOLLOW: never write through a symlink planted at that name.
            fd = os.open(self.entry_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(source)
        except OSError as exc:
            raise RequestError(422, "INIT_ERROR", f"cannot write the function's code: {exc.strerror}", {"type": type(exc).__name__}) from None

        self._replace_environment(env)
        _forget_server_dir()
        # The function's folder is not put on sys.path: an entrypoint named
        # asyncio.py must not shadow the standard library module the server
        # imports later.
        try:
            spec = importlib.util.spec_from_file_location(MODULE_NAME, self.entry_path)
            module = importlib.util.module_from_spec(spec)
            # Registered before it runs, as a normal import does (pickle, dataclasses).
            sys.modules[MODULE_NAME] = module
            spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: B036 - SystemExit at top level is the function's failure too
            sys.modules.pop(MODULE_NAME, None)
            message, details = self._describe(exc)
            raise RequestError(422, "INIT_ERROR", message, details) from None
        self._take_handler(module, entrypoint, handler_name)

    def _load_package(self, entrypoint, handler_name, env):
        """Import a package's entrypoint as a module of the package
        (`app/main.py` is `app.main`), so its relative imports work."""
        self.entry_path = os.path.join(self.package_dir, entrypoint)
        self._path_map = self._build_path_map(os.getcwd(), self.entry_path)
        self._replace_environment(env)
        _forget_server_dir()
        # As in AWS Lambda: the package's root is the first place imports
        # look, then its installed dependencies (`deps/` beside it, from its
        # requirements.txt), before the system's own packages.
        sys.path.insert(0, self.package_dir)
        deps = os.path.join(os.path.dirname(self.package_dir), DEPS_DIR)
        if os.path.isdir(deps):
            sys.path.insert(1, deps)
        module_name = entrypoint[: -len(".py")].replace("/", ".")
        try:
            module = importlib.import_module(module_name)
        except BaseException as exc:  # noqa: B036 - SystemExit at top level is the function's failure too
            message, details = self._describe(exc)
            raise RequestError(422, "INIT_ERROR", message, details) from None
        self._take_handler(module, entrypoint, handler_name)

    def _take_handler(self, module, entrypoint, handler_name):
        handler = getattr(module, handler_name, None)
        if handler is None:
            raise RequestError(422, "INIT_ERROR", f"handler '{handler_name}' is not defined in {entrypoint}", {"type": "AttributeError"})
        if not callable(handler):
            kind = type(handler).__name__
            raise RequestError(422, "INIT_ERROR", f"handler '{handler_name}' in {entrypoint} is not callable (it is a {kind})", {"type": "TypeError"})
        self.handler = handler

    def _replace_environment(self, env):
        """The function sees exactly `env` plus PATH, HOME, LANG, TMPDIR."""
        new_env = dict(env)
        # The controller's values win: HOME and TMPDIR point into the instance.
        new_env.update({k: self.base_env[k] for k in INHERITED_ENV if k in self.base_env})
        os.environ.clear()
        os.environ.update(new_env)

    # --- /run ---------------------------------------------------------------

    def run(self, body):
        """Call the handler; return the response body as bytes (always 200)."""
        global _active_run
        params = _field(body, "params", dict, "an object", default={})
        context = _field(body, "context", dict, "an object", default={})
        # Informational: the controller enforces the deadline by killing us.
        deadline = _field(body, "deadline_ms", (int, float), "a number")
        if deadline is not None and deadline < 0:
            raise RequestError(400, "BAD_REQUEST", "'deadline_ms' must not be negative")
        marker_rule = "a string of 16 to 64 characters from [A-Za-z0-9_-]"
        marker = _field(body, "log_marker", str, marker_rule)
        if marker is not None and not LOG_MARKER_RE.fullmatch(marker):
            raise RequestError(400, "BAD_REQUEST", f"'log_marker' must be {marker_rule}")
        files_token = _field(body, "files_token", str, "64 lowercase hex characters")
        if files_token is not None and not FILES_TOKEN_RE.fullmatch(files_token):
            raise RequestError(400, "BAD_REQUEST", "'files_token' must be 64 lowercase hex characters")

        if not self.initialized:
            raise RequestError(409, "NOT_INITIALIZED", "POST /init must succeed before /run")
        if not self._run_lock.acquire(blocking=False):
            raise RequestError(409, "BUSY", "a run is already in progress on this instance")
        self._run_count += 1
        _active_run = self._run_count
        _files.token = files_token
        try:
            try:
                # In a context of its own, where _RUN says which run this is.
                result = contextvars.copy_context().run(self._call_as_run, self._run_count, params, context)
            except BaseException as exc:  # noqa: B036 - SystemExit/KeyboardInterrupt from the function must not stop us
                return self._run_error(exc)
            try:
                return encode_json({"result": result})
            except Exception as exc:  # TypeError, ValueError (NaN, cycles), UnicodeEncodeError, RecursionError
                message = f"result is not JSON-serialisable: {exc}"
                details = {"type": type(exc).__name__}
                return encode_json(error_body("RUNTIME_ERROR", clean_text(self._sanitize(message)), details))
        finally:
            # Before the answer, and still holding the lock, so the next run's output comes after it:
            # all the run wrote is in the pipes when the controller reads its answer.
            if marker is not None:
                _end_logs(marker)
            else:
                _flush_std_streams()
            _active_run = None
            _files.token = None
            self._run_lock.release()

    def _call_as_run(self, run, params, context):
        _RUN.set(run)
        return self._call(params, context)

    def _call(self, params, context):
        result = self.handler(params, context)
        if isinstance(result, collections.abc.Awaitable):
            # Imported lazily: asyncio costs tens of milliseconds of start-up.
            import asyncio

            if not isinstance(result, collections.abc.Coroutine):
                result = _await(result)
            result = asyncio.run(result)
        return result

    def _run_error(self, exc):
        is_memory_error = isinstance(exc, MemoryError)
        try:
            message, details = self._describe(exc)
            code = "RUNTIME_ERROR"
            if isinstance(exc, Exception):
                try:
                    if getattr(exc, "code", None) == "INVALID_PARAMS":
                        code = "INVALID_PARAMS"
                except Exception:
                    pass
            body = encode_json(error_body(code, message, details))
        except Exception:
            # Describing failed (typically: still out of memory); answer minimally.
            body = b'{"error":{"code":"RUNTIME_ERROR","message":"the function failed and its error could not be described"}}'
        finally:
            # Drop the traceback (and the frames' locals) before collecting.
            exc.__traceback__ = None
            del exc
        if is_memory_error:
            gc.collect()
        return body

    # --- errors -------------------------------------------------------------

    def _describe(self, exc):
        """Turn an exception from the function into (message, details)."""
        details = {"type": type(exc).__name__}
        location = self._location(exc)
        if location is not None:
            details["line"], column = location
            if column is not None:
                details["column"] = column
        try:
            trace = "".join(traceback.TracebackException(type(exc), exc, self._trim(exc.__traceback__), compact=True).format())
            details["stack_trace"] = clean_text(self._sanitize(trace))
        except Exception:
            pass
        return clean_text(self._sanitize(_message(exc))), details

    def _location(self, exc):
        """(line, column) in the entrypoint file, 1-based; None if not there."""
        if self.entry_path is None:
            return None
        # A syntax error in the function's file is located by the parser.
        if isinstance(exc, SyntaxError) and exc.filename == self.entry_path and exc.lineno:
            return exc.lineno, exc.offset or None
        # Otherwise: the innermost frame in the function's file.
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename == self.entry_path and frame.lineno:
                colno = getattr(frame, "colno", None)  # Python 3.11+
                column = None
                if colno is not None:
                    column = _byte_to_char_column(frame.filename, frame.lineno, colno) + 1
                return frame.lineno, column
        return None

    def _trim(self, tb):
        """Drop the server's (and importlib's) frames from the top of a traceback."""
        first = tb
        while first is not None and first.tb_frame.f_code.co_filename != self.entry_path:
            first = first.tb_next
        if first is not None:
            return first
        # No frame of the function at all (e.g. a syntax error): drop ours only.
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if filename != SERVER_FILE and not filename.startswith("<frozen importlib"):
                break
            tb = tb.tb_next
        return tb

    def _sanitize(self, text):
        for path, replacement in self._path_map:
            text = text.replace(path, replacement)
        return text

    def _build_path_map(self, instance_dir, entry_path):
        pairs = {}
        for base in {instance_dir, os.path.realpath(instance_dir)}:
            pairs[base + os.sep] = ""
            pairs[base] = "."
            function_dir = os.path.join(base, FUNCTION_DIR)
            pairs[function_dir + os.sep] = ""
            if entry_path is not None:
                pairs[os.path.join(function_dir, os.path.basename(entry_path))] = os.path.basename(entry_path)
        if self.package_dir is not None:
            pairs[self.package_dir + os.sep] = ""
            pairs[os.path.join(os.path.dirname(self.package_dir), DEPS_DIR) + os.sep] = "deps/"
        return sorted(pairs.items(), key=lambda pair: len(pair[0]), reverse=True)


def _forget_server_dir():
    """The runtime's own folder (sys.path[0] when started as a script) is not
    importable by the function."""
    if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.realpath(os.path.dirname(SERVER_FILE)):
        del sys.path[0]


# --- Late writes ---------------------------------------------------------------
#
# A run's logs are what reaches stdout/stderr between its start and its answer
# (or its marker).
# A thread or task a run leaves behind would otherwise write into a later run's
# logs, which may be another user's execution. So the handler is called with
# _RUN set to its run's number in a context of its own; asyncio tasks inherit
# it, and the wrappers below make threads and thread-pool work inherit it from
# the code that starts or submits them. sys.stdout and sys.stderr drop what is
# written for a run other than the one in progress. Code with no run (the
# module's top level and the threads it starts, the server) writes freely.
# Not covered: writes that bypass sys.stdout/sys.stderr (os.write(1, ...),
# sys.__stdout__, child processes, threads from _thread.start_new_thread).

# The run the running code belongs to (its number), or None.
_RUN = contextvars.ContextVar("fnrt_run", default=None)

# The number of the run in progress, until its markers are written; or None.
_active_run = None


def _is_late():
    run = _RUN.get()
    return run is not None and run != _active_run


class _RunStream:
    """A real stream (text, or its binary buffer) whose write() drops what is
    written for a run other than the one in progress; the rest is delegated."""

    def __init__(self, stream):
        self._stream = stream
        inner = getattr(stream, "buffer", None)
        self._buffer = _RunStream(inner) if inner is not None else None

    def write(self, data):
        if _is_late():
            return len(data)
        return self._stream.write(data)

    def writelines(self, lines):
        if not _is_late():
            self._stream.writelines(lines)

    @property
    def buffer(self):
        if self._buffer is None:
            return self._stream.buffer  # raises AttributeError, as the real one does
        return self._buffer

    def __getattr__(self, name):
        if name == "_stream":  # not set yet (a copy made without __init__)
            raise AttributeError(name)
        return getattr(self._stream, name)

    def __repr__(self):
        return repr(self._stream)


def _thread_start_in_context(start):
    @functools.wraps(start)
    def start_in_context(self):
        # As asyncio.to_thread does: the thread runs in a copy of its starter's context.
        context = contextvars.copy_context()
        own = self.__dict__.get("run")
        run = self.run

        def run_in_context():
            try:
                context.run(run)
            finally:
                if own is None:
                    self.__dict__.pop("run", None)
                else:
                    self.run = own

        self.run = run_in_context
        return start(self)

    return start_in_context


def _submit_in_context(submit):
    @functools.wraps(submit)
    def submit_in_context(self, fn, /, *args, **kwargs):
        # A pool's threads outlive the run that made them: the work is the submitter's.
        return submit(self, contextvars.copy_context().run, fn, *args, **kwargs)

    return submit_in_context


class _PatchPoolsOnImport:
    """On `sys.meta_path` until `concurrent.futures.thread` is imported,
    then patches its `ThreadPoolExecutor.submit` as it loads. Importing it
    at start-up (and `logging` with it) would cost every instance's start
    for the functions that use a pool."""

    MODULE = "concurrent.futures.thread"

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != cls.MODULE:
            return None
        sys.meta_path.remove(cls)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            pool = module.ThreadPoolExecutor
            pool.submit = _submit_in_context(pool.submit)

        spec.loader.exec_module = exec_and_patch
        return spec


def _attribute_writes_to_runs():
    """Install the late-write filter and the context inheritance (once, at start-up)."""
    threading.Thread.start = _thread_start_in_context(threading.Thread.start)
    sys.meta_path.insert(0, _PatchPoolsOnImport)
    if sys.stdout is not None:
        sys.stdout = _RunStream(sys.stdout)
    if sys.stderr is not None:
        sys.stderr = _RunStream(sys.stderr)


async def _await(awaitable):
    return await awaitable


def _message(exc):
    if isinstance(exc, MemoryError):
        return "out of memory" + (f": {exc}" if str(exc) else "")
    if isinstance(exc, SystemExit):
        return f"the function tried to exit (SystemExit: {exc.code!r})"
    if isinstance(exc, KeyboardInterrupt):
        return "the function raised KeyboardInterrupt"
    try:
        text = str(exc)
    except Exception:
        text = ""
    return text or type(exc).__name__


def _flush_std_streams():
    # A partial line stays buffered; flush so the controller has all the
    # function's output even if the instance is killed next. The function may
    # have replaced sys.stdout/sys.stderr: flush those and the real ones.
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def _end_logs(marker):
    """End a run's logs: once the function's output is flushed, `marker` and a
    newline go straight to fds 1 and 2 (past a replaced sys.stdout). No newline
    before it: the controller takes a line ending in the marker as the end."""
    _flush_std_streams()
    line = (marker + "\n").encode("ascii")
    for fd in (1, 2):
        data = line
        try:
            while data:
                written = os.write(fd, data)
                data = data[written:]
        except OSError:
            pass  # a closed pipe: nobody reads it any more


# Status -> error code for the answers the HTTP layer produces by itself.
_STATUS_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    414: "BAD_REQUEST",
    431: "BAD_REQUEST",
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
    505: "BAD_REQUEST",
}

# Reason phrases of the statuses this server sends.
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    414: "Request-URI Too Long",
    422: "Unprocessable Entity",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}

_ROUTES = {"/health": "GET", "/init": "POST", "/run": "POST"}

# Longest request or header line, and most header fields, of one request.
MAX_LINE_BYTES = 65536
MAX_HEADERS = 100


class Handler(socketserver.StreamRequestHandler):
    """HTTP/1.1 front of the runtime: keep-alive, routing, bounded bodies,
    JSON answers (its own errors too). Not `http.server`: importing it (and
    `http.client`, `email` with it) was about half of the runtime's start,
    and the runtime needs a small part of it."""

    def handle(self):
        while True:
            self._handle_one_request()
            if self.close_connection:
                return

    def _handle_one_request(self):
        self.close_connection = True
        self.headers = {}
        line = self.rfile.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES:
            self.send_error(414)
            return
        request_line = line.decode("iso-8859-1").rstrip("\r\n")
        words = request_line.split()
        if not words:
            return
        if len(words) != 3:
            self.send_error(400, f"Bad request syntax ({request_line!r})")
            return
        command, self.path, version = words
        version_number = _http_version(version)
        if version_number is None:
            self.send_error(400, f"Bad request version ({version!r})")
            return
        if version_number >= (2, 0):
            self.send_error(505, f"Invalid HTTP version ({version})")
            return
        if not self._read_headers():
            return
        connection = self._header("connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive" or version_number >= (1, 1):
            self.close_connection = False
        if (
            self._header("expect", "").lower() == "100-continue"
            and version_number >= (1, 1)
            and not self._continue()
        ):
            return
        if command in ("GET", "POST"):
            self._dispatch(command)
        else:
            self.send_error(501, f"Unsupported method ({command!r})")

    def _read_headers(self):
        """Header fields into self.headers (lower-case name -> values); False
        once an error was sent."""
        count = 0
        while True:
            line = self.rfile.readline(MAX_LINE_BYTES + 1)
            if len(line) > MAX_LINE_BYTES:
                self.send_error(431, "Line too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                return True
            count += 1
            if count > MAX_HEADERS:
                self.send_error(431, "Too many headers")
                return False
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if not colon or name[:1] in (" ", "\t"):
                self.send_error(400, "Bad header line")
                return False
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())

    def _header(self, name, default=None):
        values = self.headers.get(name)
        return values[0] if values else default

    def _dispatch(self, method):
        runtime = self.server.runtime
        path = self.path.split("?", 1)[0]
        try:
            if _ROUTES.get(path) != method:
                # Answering without reading a body would desynchronise keep-alive.
                self._discard_body()
                if path not in _ROUTES:
                    raise RequestError(404, "NOT_FOUND", f"no route {path}")
                raise RequestError(405, "METHOD_NOT_ALLOWED", f"{path} takes {_ROUTES[path]}")
            if path == "/health":
                self._reply(200, encode_json(runtime.health()))
            elif path == "/init":
                body = parse_json_object(self._read_body())
                self._reply(200, encode_json(runtime.init(body)))
            else:
                body = parse_json_object(self._read_body())
                self._reply(200, runtime.run(body))
        except RequestError as exc:
            self._reply(exc.status, encode_json(error_body(exc.code, clean_text(exc.message), exc.details)))
        except MemoryError:
            self.close_connection = True
            self._reply(500, b'{"error":{"code":"INTERNAL_ERROR","message":"runtime out of memory"}}')
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            self._reply(500, encode_json(error_body("INTERNAL_ERROR", "internal error in the Python runtime")))

    # --- bodies -------------------------------------------------------------

    def _read_body(self):
        """Read the request body, at most MAX_BODY_BYTES, or raise BAD_REQUEST."""
        transfer_encoding = self._header("transfer-encoding")
        if transfer_encoding is not None:
            if transfer_encoding.strip().lower() != "chunked":
                self.close_connection = True
                raise RequestError(400, "BAD_REQUEST", f"unsupported Transfer-Encoding: {transfer_encoding}")
            return self._read_chunked()
        length = self._content_length()
        if length is None:
            return b""
        if length > MAX_BODY_BYTES:
            # The body stays unread, so the connection cannot be reused.
            self.close_connection = True
            raise RequestError(400, "BAD_REQUEST", f"body is larger than {MAX_BODY_BYTES} bytes")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise RequestError(400, "BAD_REQUEST", "body is shorter than Content-Length")
        return data

    def _content_length(self):
        values = self.headers.get("content-length") or []
        if not values:
            return None
        if len(set(values)) != 1 or not (values[0].isascii() and values[0].isdigit()):
            self.close_connection = True
            raise RequestError(400, "BAD_REQUEST", "invalid Content-Length")
        return int(values[0])

    def _read_chunked(self):
        chunks = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                size = -1
            if not line.endswith(b"\n") or size < 0:
                self.close_connection = True
                raise RequestError(400, "BAD_REQUEST", "malformed chunked body")
            if size == 0:
                break
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise RequestError(400, "BAD_REQUEST", f"body is larger than {MAX_BODY_BYTES} bytes")
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                self.close_connection = True
                raise RequestError(400, "BAD_REQUEST", "malformed chunked body")
            chunks.append(data)
        # Trailer fields, up to the empty line.
        for _ in range(100):
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n", b""):
                break
        else:
            self.close_connection = True
        return b"".join(chunks)

    def _discard_body(self):
        try:
            self._read_body()
        except RequestError:
            pass

    def _continue(self):
        """Answers `Expect: 100-continue`: refuses an oversized body before
        the client sends it (False), else lets it come."""
        try:
            length = self._content_length()
        except RequestError:
            length = None
        if length is not None and length > MAX_BODY_BYTES:
            self.close_connection = True
            self._reply(400, encode_json(error_body("BAD_REQUEST", f"body is larger than {MAX_BODY_BYTES} bytes")))
            return False
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    # --- answers ------------------------------------------------------------

    def _reply(self, status, payload):
        """One write: status line, headers and body."""
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            "Server: python-runtime\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            + ("Connection: close\r\n" if self.close_connection else "")
            + "\r\n"
        )
        self.wfile.write(head.encode("latin-1") + payload)

    def send_error(self, code, message=None):
        """The HTTP layer's own errors (bad request line, unknown method) as JSON."""
        self.close_connection = True
        text = message or _REASONS.get(code, "error")
        try:
            self._reply(code, encode_json(error_body(_STATUS_CODES.get(code, "BAD_REQUEST"), text)))
        except OSError:
            pass


def _http_version(text):
    """(major, minor) of `HTTP/1.1`, or None when it is not a version."""
    if not text.startswith("HTTP/"):
        return None
    major, dot, minor = text[5:].partition(".")
    if not dot or not major.isdigit() or not minor.isdigit() or len(major) > 10 or len(minor) > 10:
        return None
    return int(major), int(minor)


class ThreadingUnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection, so /health answers during a run."""

    daemon_threads = True

    def __init__(self, path, runtime):
        self.runtime = runtime
        super().__init__(path, Handler)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return  # the controller went away; nothing to report
        sys.stderr.write("python-runtime: error while serving a connection:\n")
        traceback.print_exc(file=sys.stderr)


def remove_stale_socket(path):
    """Remove a socket file left by an earlier run; refuse to delete anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"python-runtime: {path} exists and is not a socket")
    os.unlink(path)


# --- import fnrt: the function's helpers ------------------------------------
#
# fnrt.files.read(file_id) -> bytes, fnrt.files.info(file_id) -> dict,
# fnrt.files.write(data, name="") -> the new file's info: the caller's files,
# through the controller's files socket (files.sock beside ours), with the key
# the controller gave this run. Outside the run in progress (module top level,
# a thread an earlier run left behind) they raise FilesError: a key opens its
# own run's files only, and only while that run lasts.

FILES_TOKEN_RE = re.compile(r"[0-9a-f]{64}")
FILE_ID_RE = re.compile(r"[0-9A-Fa-f-]{1,64}")


class FilesError(Exception):
    """A files call failed; `code` is the contract's code (NOT_FOUND, ...)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _unix_connection(path, timeout):
    """An HTTP connection to the files socket. `http.client` is imported
    here, on a function's first files call, not at every instance's start."""
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(path)
            self.sock = sock

    return UnixConnection("localhost", timeout=timeout)


class _Files:
    def __init__(self):
        self.socket = None
        self.token = None

    def _key(self):
        if _RUN.get() is None or _RUN.get() != _active_run:
            raise FilesError("NO_RUN", "fnrt.files is usable only while the function runs, from its own run")
        if not self.token:
            raise FilesError("UNAVAILABLE", "files are not available to this run")
        return self.token

    def _call(self, method, path, body=None):
        key = self._key()
        conn = _unix_connection(self.socket, timeout=600)
        try:
            try:
                conn.request(method, path, body=body, headers={"Authorization": "Bearer " + key})
                answer = conn.getresponse()
                data = answer.read()
            except OSError as exc:
                raise FilesError("UNAVAILABLE", f"the files socket: {exc.strerror or exc}") from None
        finally:
            conn.close()
        if 200 <= answer.status < 300:
            return data
        try:
            error = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "UNAVAILABLE", "message": f"files answered {answer.status}"}
        raise FilesError(error.get("code"), error.get("message"))

    @staticmethod
    def _id(file_id):
        if not isinstance(file_id, str) or not FILE_ID_RE.fullmatch(file_id):
            raise FilesError("INVALID_REQUEST", "a file id is a string (from an upload or an earlier write)")
        return file_id

    def read(self, file_id):
        """The file's bytes."""
        return self._call("GET", f"/api/v1/files/{self._id(file_id)}")

    def info(self, file_id):
        """The file's name, size, content type, sha256 and times."""
        return json.loads(self._call("GET", f"/api/v1/files/{self._id(file_id)}/meta"))

    def write(self, data, name=""):
        """Stores `data` (bytes or str) as a new file of the caller's; its info."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        import urllib.parse

        query = urllib.parse.urlencode({"name": name})
        return json.loads(self._call("POST", f"/api/v1/files?{query}", bytes(data)))


_files = _Files()


def _install_fnrt_module(socket_path):
    """Makes `import fnrt` give the helpers."""
    _files.socket = os.path.join(os.path.dirname(os.path.abspath(socket_path)), "files.sock")
    module = types.ModuleType("fnrt", "The function runtime's helpers: fnrt.files (read, info, write).")
    module.files = _files
    module.FilesError = FilesError
    sys.modules["fnrt"] = module


def _add_system_site_packages():
    """Started with -S (the controller does: site would run every `.pth`
    file of the host's site-packages at each instance's start, tens of
    milliseconds of code nobody asked for), the system's site-packages
    directories still go on sys.path, where site puts them, without their
    `.pth` files."""
    if not sys.flags.no_site:
        return
    import site  # with -S, importing it runs nothing

    for directory in site.getsitepackages():
        if os.path.isdir(directory) and directory not in sys.path:
            sys.path.append(directory)


def _usage_error(message):
    sys.stderr.write(f"server.py: {message}\nusage: python3 server.py --socket PATH\n")
    raise SystemExit(2)


def _parse_args(argv):
    """`--socket PATH` (or `--socket=PATH`) and `--no-warm-up`, as the Node
    runtime takes them; anything else exits 2. Not argparse: importing it
    is a few milliseconds of every instance's start."""
    socket_path = None
    warm_up = True
    args = iter(argv)
    for arg in args:
        if arg == "--no-warm-up":
            warm_up = False
        elif arg == "--socket":
            socket_path = next(args, "")
            if socket_path == "":
                _usage_error("--socket needs a path")
        elif arg.startswith("--socket="):
            socket_path = arg[len("--socket=") :]
            if socket_path == "":
                _usage_error("--socket needs a path")
        else:
            _usage_error(f"unknown argument: {arg}")
    if socket_path is None:
        _usage_error("--socket is required")
    return types.SimpleNamespace(socket=socket_path, warm_up=warm_up)


def _warm_up():
    """The first `compile()` in a process costs about 0.75 ms (later ones
    of a small module 0.02-0.05 ms): paid here, before the socket listens,
    it is not paid by the `/init` a caller waits for when the instance comes
    from the pool. A cold start (`--no-warm-up`) compiles its function at
    once anyway."""
    compile("pass", "<warm-up>", "exec", dont_inherit=True)


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    _add_system_site_packages()

    # A pipe makes stdout block-buffered; line by line, the controller gets
    # each line while the run goes on (live logs).
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except Exception:
        pass
    _attribute_writes_to_runs()

    # A multi-file function's files are put beside the socket.
    package_dir = os.path.join(os.path.dirname(os.path.abspath(args.socket)), FUNCTION_DIR)
    _install_fnrt_module(args.socket)
    runtime = Runtime(dict(os.environ), package_dir)
    if args.warm_up:
        _warm_up()
    remove_stale_socket(args.socket)
    try:
        server = ThreadingUnixHTTPServer(args.socket, runtime)
    except OSError as exc:
        raise SystemExit(f"python-runtime: cannot listen on {args.socket}: {exc}") from None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
