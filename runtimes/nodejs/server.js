'use strict';
/**
 * Node.js runtime server.
 *
 * The controller starts this file as a child process (or container) with
 * `--socket PATH`, specialises it once with a function's code (`POST /init`)
 * and then calls the function (`POST /run`), one run at a time. The protocol
 * is described in docs/runtime-protocol.md; this file implements it with
 * Node's standard library only, so a runtime starts with nothing installed.
 *
 * Layout of this file:
 *   - command line            `--socket PATH [--no-warm-up]`, anything else exits 2
 *   - instance state          fresh -> initialized | failed; the run in progress
 *   - error reporting         thrown value -> {code, message, details}, host paths scrubbed
 *   - /init and /run          the two operations
 *   - HTTP plumbing           bounded JSON bodies, JSON responses, routing
 *
 * stdout and stderr belong to the function; the server itself writes only
 * short diagnostics to stderr, and a run's `log_marker` to both when it ends.
 * Everything a run wrote is in the pipes before its answer.
 * A write the function's code makes for a run that is no longer the one in
 * progress (a timer or a promise an earlier run left behind) is dropped: see
 * "Late writes" below. So is an uncaught error or unhandled rejection of such
 * a run: see onStrayError.
 */

const { AsyncLocalStorage } = require('async_hooks');
const fs = require('fs');
const http = require('http');
const Module = require('module');
const os = require('os');
const path = require('path');
const { setTimeout: sleep } = require('timers/promises');
const { pathToFileURL } = require('url');
const util = require('util');

/** Largest request body the server buffers; bigger bodies are drained and refused. */
const MAX_BODY_BYTES = 16 * 1024 * 1024;
/** Entrypoints are plain file names: no directories, so the code stays in ./function/. */
const ENTRYPOINT_RE = /^[A-Za-z0-9_.-]{1,64}$/;
/** The only variables of the original environment the function keeps. */
const KEPT_ENV = ['PATH', 'HOME', 'LANG', 'TMPDIR'];
/** A /run's `log_marker`, written on both streams when the run ends. */
const LOG_MARKER_RE = /^[A-Za-z0-9_-]{16,64}$/;
/** A /run's `files_token`: the run's key to its caller's files. */
const FILES_TOKEN_RE = /^[0-9a-f]{64}$/;

// Deep call chains in user code would otherwise push the frame we report
// (the innermost one in the entrypoint file) out of the default 10 frames.
Error.stackTraceLimit = 50;

function log(message) {
  process.stderr.write(`[nodejs-runtime] ${message}\n`);
}

// ---------------------------------------------------------------------------
// Command line

function usageError(message) {
  process.stderr.write(`server.js: ${message}\nusage: node server.js --socket PATH [--no-warm-up]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  let socketPath = null;
  let warmUp = true;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--no-warm-up') {
      warmUp = false;
    } else if (arg === '--socket') {
      if (i + 1 >= argv.length || argv[i + 1] === '') usageError('--socket needs a path');
      socketPath = argv[++i];
    } else if (arg.startsWith('--socket=')) {
      socketPath = arg.slice('--socket='.length);
      if (socketPath === '') usageError('--socket needs a path');
    } else {
      usageError(`unknown argument: ${arg}`);
    }
  }
  if (socketPath === null) usageError('--socket is required');
  return { socketPath, warmUp };
}

// ---------------------------------------------------------------------------
// Instance state

const state = {
  /** 'fresh' until /init is attempted, then 'initialized' or 'failed' (never re-initialised). */
  phase: 'fresh',
  /** True until the start-up warm-up (see warmUp) is over: /health says 503 STARTING meanwhile. */
  warming: true,
  /** The loaded module's exports and the handler taken from them. */
  exports: null,
  handler: null,
  /** Absolute paths of ./function/ and the entrypoint in it, used to locate and scrub errors. */
  functionDir: null,
  entryFile: null,
  /** ./function/, when the start-up warm-up made it ready for a single-file function. */
  preparedDir: null,
  /** Where the controller puts a multi-file function's files: `function/` beside the socket. */
  packageDir: null,
  /**
   * The run in progress (until its logs are ended), or null; `fail(err)` ends it
   * with an uncaught error, and is null once its outcome is decided.
   */
  currentRun: null,
  /** process.stdout and process.stderr as they were at start-up (a function may replace them). */
  stdio: null,
  /** How many runs have started: each run's sequence number, the value of its `runStore`. */
  runCount: 0,
  /** The controller's files socket: `files.sock` beside ours. */
  filesSocket: null,
};

// ---------------------------------------------------------------------------
// Late writes
//
// A run's logs are what reaches stdout/stderr between its start and its
// marker. Work the function leaves running past a run (a setTimeout, an
// unawaited promise) would otherwise write into a later run's logs, which may
// be another user's execution. Each handler call therefore runs inside
// `runStore` holding its run's sequence number, which Node carries into every
// timer, promise and callback made from it; a write whose store names a run
// other than the one in progress (or names a run while none is) is dropped.
// Writes with no store at all (code at module top level and the timers it
// sets) carry no run's data and pass. Writes that do not go through
// process.stdout/stderr.write (fs.writeSync(1), a child process's inherited
// stdio) are not seen here.

const runStore = new AsyncLocalStorage();

/** True when the calling code belongs to a run other than the one in progress. */
function isLateWrite() {
  const owner = runStore.getStore();
  if (owner === undefined) return false;
  return state.currentRun === null || owner !== state.currentRun.seq;
}

/**
 * Wraps `stream.write` (console.log and console.error go through it) so that a
 * late write is dropped as if written: true, and its callback still called.
 * A function that replaces the method later replaces this too: its business.
 */
function dropLateWrites(stream) {
  const realWrite = stream.write;
  stream.write = function write(...args) {
    if (!isLateWrite()) return Reflect.apply(realWrite, this, args);
    // write(chunk, callback) or write(chunk, encoding, callback)
    const callback = typeof args[1] === 'function' ? args[1] : args[2];
    if (typeof callback === 'function') process.nextTick(callback, null);
    return true;
  };
}

// An error thrown or a promise rejected outside the handler's own promise chain
// (a stray setTimeout, a forgotten promise) must not kill the instance. Node
// calls these handlers in the async context of the code that threw (for a
// rejection, of the code that made the promise), so `runStore` tells whose it
// is, as it does for late writes:
//   - of another run (an earlier run's timer firing during a later run, or after
//     its own run is over): dropped. Its message may hold the earlier run's data
//     and must reach neither the answer nor the logs of a later run, perhaps
//     another user's; the earlier run has answered already, so nobody hears of it.
//   - of the run in progress: that run's error; once its answer is decided, only
//     logged (in its own logs: its marker is not written yet).
//   - of no run (module top level and the timers it sets): the run in progress's
//     error, as the most likely culprit; outside a run it is only logged.
function onStrayError(err, kind) {
  if (isLateWrite()) return;
  if (state.currentRun !== null && state.currentRun.fail !== null) {
    state.currentRun.fail(err);
  } else {
    log(`${kind} outside a run: ${safeInspect(err)}`);
  }
}
process.on('uncaughtException', (err) => onStrayError(err, 'uncaught exception'));
process.on('unhandledRejection', (reason) => onStrayError(reason, 'unhandled rejection'));

// ---------------------------------------------------------------------------
// Error reporting

function safeInspect(value) {
  try {
    return scrub(util.inspect(value));
  } catch {
    return '<uninspectable value>';
  }
}

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * Removes host paths from text shown to clients: the function directory and
 * the instance directory become relative (`index.js:10:5`), frames of this
 * server are dropped, and other mentions of it (Node's "Require stack")
 * become `<runtime>`.
 */
function scrub(text) {
  let out = String(text)
    .split('\n')
    .filter((line) => !(/^\s+at /.test(line) && line.includes(__filename)))
    .join('\n');
  out = out.split(__filename).join('<runtime>');
  if (state.functionDir === null) return out;

  const instanceDir = path.dirname(state.functionDir);
  const prefixes = [pathToFileURL(state.functionDir).href + '/', state.functionDir + path.sep];
  // An instance directory of "/" would turn every slash into something else.
  const scrubInstance = instanceDir !== path.parse(instanceDir).root;
  if (scrubInstance) prefixes.push(pathToFileURL(instanceDir).href + '/', instanceDir + path.sep);
  for (const prefix of prefixes) out = out.split(prefix).join('');
  if (scrubInstance) {
    // The bare instance directory (process.cwd() in a message), not a longer name it prefixes.
    out = out.replace(new RegExp(`${escapeRegExp(instanceDir)}(?=$|[\\s'"\`),:\\]])`, 'gm'), '.');
  }
  return out;
}

/**
 * Finds the 1-based line and column of the innermost stack frame in the
 * entrypoint file. A SyntaxError raised while loading has no such frame;
 * Node puts the location in a `FILE:LINE` header with a caret line instead.
 */
function locate(stack) {
  if (typeof stack !== 'string' || state.entryFile === null) return {};
  const lines = stack.split('\n');

  const header = /^(.*):(\d+)$/.exec(lines[0]);
  if (header !== null && header[1] === state.entryFile) {
    const caret = lines.length > 2 ? lines[2].indexOf('^') : -1;
    const where = { line: Number(header[2]) };
    if (caret >= 0) where.column = caret + 1;
    return where;
  }

  const frame = new RegExp(`${escapeRegExp(state.entryFile)}:(\\d+):(\\d+)`);
  for (const line of lines) {
    if (!/^\s+at /.test(line)) continue;
    const m = frame.exec(line);
    if (m !== null) return { line: Number(m[1]), column: Number(m[2]) };
  }
  return {};
}

/** The class name to report: a subclass's own name, else the error's `name`. */
function errorType(err) {
  const ctorName = err.constructor && err.constructor.name;
  if (typeof ctorName === 'string' && ctorName !== '' && ctorName !== 'Error') return ctorName;
  if (typeof err.name === 'string' && err.name !== '') return err.name;
  return 'Error';
}

/**
 * Turns anything a function may throw (an Error, a string, 42, null, an
 * object with a hostile getter) into the protocol's error body. `fallbackCode`
 * is RUNTIME_ERROR for runs and INIT_ERROR for /init.
 */
function describeThrown(thrown, fallbackCode) {
  try {
    const isObject = thrown !== null && (typeof thrown === 'object' || typeof thrown === 'function');
    const isError = util.types.isNativeError(thrown) || thrown instanceof Error;

    let code = fallbackCode;
    if (fallbackCode === 'RUNTIME_ERROR' && isObject && thrown.code === 'INVALID_PARAMS') {
      code = 'INVALID_PARAMS';
    }

    const details = {};
    let message;
    if (isError) {
      details.type = errorType(thrown);
      message = typeof thrown.message === 'string' ? thrown.message : String(thrown.message ?? '');
      const stack = thrown.stack;
      Object.assign(details, locate(stack));
      if (typeof stack === 'string') details.stack_trace = scrub(stack);
    } else if (isObject) {
      // A plain object: use its message if it has one, else show it as JSON.
      details.type = (thrown.constructor && thrown.constructor.name) || 'Object';
      if (typeof thrown.message === 'string') {
        message = thrown.message;
      } else {
        try {
          message = JSON.stringify(thrown) ?? Object.prototype.toString.call(thrown);
        } catch {
          message = Object.prototype.toString.call(thrown);
        }
      }
    } else {
      // A primitive: throw "x", throw 42, throw null, throw undefined.
      details.type = thrown === null ? 'null' : typeof thrown;
      message = String(thrown);
    }
    if (message === '') message = `${details.type} thrown with an empty message`;
    return { code, message: scrub(message), details };
  } catch {
    // Reading the thrown value itself threw (a Proxy, a getter): still answer.
    return {
      code: fallbackCode,
      message: 'the function threw a value that could not be inspected',
      details: { type: 'unknown' },
    };
  }
}

// ---------------------------------------------------------------------------
// Request validation helpers

function isPlainObject(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}

class BadRequest extends Error {}

function optionalString(body, key, fallback) {
  if (body[key] === undefined) return fallback;
  if (typeof body[key] !== 'string') throw new BadRequest(`"${key}" must be a string`);
  return body[key];
}

// ---------------------------------------------------------------------------
// POST /init

/**
 * Replaces the environment (the real one, so child processes see it too) with
 * `env` plus the kept variables. The kept ones are the runtime's to set: the
 * controller refuses manifests that name them, and they are ignored here too.
 */
function applyEnvironment(env) {
  for (const key of Object.keys(process.env)) {
    if (!KEPT_ENV.includes(key)) delete process.env[key];
  }
  for (const [key, value] of Object.entries(env)) {
    if (!KEPT_ENV.includes(key)) process.env[key] = value;
  }
}

function parseInit(body) {
  if (!isPlainObject(body)) throw new BadRequest('body must be a JSON object');
  optionalString(body, 'language_title', '');
  if (body.version !== undefined && !Number.isInteger(body.version)) {
    throw new BadRequest('"version" must be an integer');
  }

  const entrypoint = body.entrypoint;
  if (typeof entrypoint !== 'string') throw new BadRequest('"entrypoint" must be a string');
  if (body.package !== undefined && typeof body.package !== 'boolean') {
    throw new BadRequest('"package" must be a boolean');
  }
  const isPackage = body.package === true;
  if (isPackage) {
    const parts = entrypoint.split('/');
    if (!parts.every((p) => ENTRYPOINT_RE.test(p) && p !== '.' && p !== '..')) {
      throw new BadRequest('"entrypoint" must be a relative path of [A-Za-z0-9_.-] parts');
    }
    let placed = false;
    try {
      placed = fs.statSync(path.join(state.packageDir, entrypoint)).isFile();
    } catch {
      placed = false;
    }
    if (!placed) throw new BadRequest(`the package's "${entrypoint}" is not in place`);
  } else if (!ENTRYPOINT_RE.test(entrypoint) || entrypoint === '.' || entrypoint === '..') {
    throw new BadRequest('"entrypoint" must be a plain file name matching [A-Za-z0-9_.-]{1,64}');
  }

  const handler = optionalString(body, 'handler', 'handler');
  if (handler === '') throw new BadRequest('"handler" must not be empty');

  if (typeof body.code !== 'string') throw new BadRequest('"code" must be a string');

  const env = body.env === undefined || body.env === null ? {} : body.env;
  if (!isPlainObject(env)) throw new BadRequest('"env" must be an object of strings');
  for (const [key, value] of Object.entries(env)) {
    if (key === '' || key.includes('=') || key.includes('\0')) {
      throw new BadRequest(`"env" has an invalid variable name: ${JSON.stringify(key)}`);
    }
    if (typeof value !== 'string' || value.includes('\0')) {
      throw new BadRequest(`"env.${key}" must be a string without NUL bytes`);
    }
  }

  return { entrypoint, handler, code: body.code, env, isPackage };
}

/** `exports[name]`, except that a name like "toString" must not find a built-in method. */
function lookupHandler(exported, name) {
  if (exported === null || (typeof exported !== 'object' && typeof exported !== 'function')) return undefined;
  const inherited = name in Object.prototype || (typeof exported === 'function' && name in Function.prototype);
  if (inherited && !Object.prototype.hasOwnProperty.call(exported, name)) return undefined;
  return exported[name];
}

/**
 * Loads the function `body` describes; `functionDir` is where its one file
 * goes (./function/ but for the start-up warm-up's own).
 */
function handleInit(body, functionDir = path.resolve('function')) {
  if (state.phase === 'initialized') {
    return [409, errorBody('ALREADY_INITIALIZED', 'this instance is already initialized')];
  }
  if (state.phase === 'failed') {
    return [409, errorBody('ALREADY_INITIALIZED', 'a previous /init failed; this instance cannot be reused')];
  }

  let request;
  try {
    request = parseInit(body);
  } catch (err) {
    if (err instanceof BadRequest) return [400, errorBody('BAD_REQUEST', err.message)];
    throw err;
  }

  // From here on the attempt counts: a failed load may leave half-run module
  // code behind, so the instance is never initialised a second time.
  state.phase = 'failed';
  // A package's files are in place already; one file is written here.
  state.functionDir = request.isPackage ? state.packageDir : functionDir;
  state.entryFile = path.join(state.functionDir, request.entrypoint);

  try {
    if (!request.isPackage) {
      // A pooled instance's warm-up made the directory already.
      if (state.preparedDir !== state.functionDir) prepareFunctionDir(state.functionDir);
      // Written even though a CommonJS entrypoint is compiled from memory:
      // a function may read its own file.
      fs.writeFileSync(state.entryFile, request.code);
    }
  } catch (err) {
    return [422, errorBody('INIT_ERROR', `could not write the function's code: ${scrub(err.message)}`)];
  }

  // The module's top level must already see the function's environment.
  applyEnvironment(request.env);

  let exported;
  try {
    exported =
      !request.isPackage && COMPILED_ENTRY_RE.test(request.entrypoint)
        ? compileEntry(state.entryFile, request.code)
        : require(state.entryFile);
  } catch (err) {
    const { message, details } = describeThrown(err, 'INIT_ERROR');
    return [422, errorBody('INIT_ERROR', message, details)];
  }

  const fn = lookupHandler(exported, request.handler);
  if (fn === undefined) {
    return [422, errorBody('INIT_ERROR', `${request.entrypoint} does not export "${request.handler}"`, { type: 'TypeError' })];
  }
  if (typeof fn !== 'function') {
    return [422, errorBody('INIT_ERROR', `export "${request.handler}" of ${request.entrypoint} is a ${typeof fn}, not a function`, { type: 'TypeError' })];
  }

  state.exports = exported;
  state.handler = fn;
  state.phase = 'initialized';
  return [200, { status: 'initialized' }];
}

/**
 * Makes a single-file function's directory: `package.json` in it pins `.js`
 * to CommonJS, so that a package.json further up cannot turn it into ESM.
 */
function prepareFunctionDir(dir) {
  try {
    fs.mkdirSync(dir);
  } catch (err) {
    if (err.code !== 'EEXIST') throw err;
  }
  fs.writeFileSync(path.join(dir, 'package.json'), '{"type":"commonjs"}\n');
}

/** Entrypoints whose source is CommonJS for certain (see prepareFunctionDir). */
const COMPILED_ENTRY_RE = /\.c?js$/;

/**
 * What `require(filename)` does for a CommonJS file whose source is at
 * hand, without resolving the path and reading the file back: the module
 * registered under its path (so that requiring it again finds it), given
 * the same lookup paths, compiled and run. A pooled instance's `/init` is
 * what a caller waits for, and on these machines the resolution and the
 * read were a third of loading the module (`require` 0.45 ms, this 0.30,
 * timed inside the runtime).
 */
function compileEntry(filename, source) {
  const entry = new Module(filename, module);
  entry.filename = filename;
  entry.paths = Module._nodeModulePaths(path.dirname(filename));
  Module._cache[filename] = entry;
  try {
    entry._compile(source, filename);
  } catch (err) {
    delete Module._cache[filename];
    throw err;
  }
  entry.loaded = true;
  return entry.exports;
}

// ---------------------------------------------------------------------------
// require('fnrt'): the function's helpers
//
// `files.read(fileId)` -> Buffer, `files.info(fileId)` -> {file_id, name, size,
// content_type, sha256, ...}, `files.write(data, {name})` -> the new file's
// info: the caller's files, through the controller's files socket, with the
// key the controller gave this run. Outside a run (module top level, a timer
// left behind by an earlier run) they throw: a key opens its own run's files
// only, and only while that run lasts.

class FilesError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'FilesError';
    this.code = code;
  }
}

function runFilesToken() {
  const run = state.currentRun;
  if (run === null || runStore.getStore() !== run.seq) {
    throw new FilesError('NO_RUN', 'fnrt.files is usable only while the function runs, from its own run');
  }
  if (!run.filesToken) throw new FilesError('UNAVAILABLE', 'files are not available to this run');
  return run.filesToken;
}

function filesCall(method, urlPath, body) {
  const token = runFilesToken();
  return new Promise((resolve, reject) => {
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers['Content-Length'] = body.length;
    const req = http.request({ socketPath: state.filesSocket, path: urlPath, method, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const data = Buffer.concat(chunks);
        if (res.statusCode >= 200 && res.statusCode < 300) return resolve(data);
        let error = { code: 'UNAVAILABLE', message: `files answered ${res.statusCode}` };
        try {
          error = JSON.parse(data.toString('utf8')).error || error;
        } catch (_) {
          // not the contract's body: keep the status
        }
        reject(new FilesError(error.code, error.message));
      });
      res.on('error', reject);
    });
    req.on('error', (err) => reject(new FilesError('UNAVAILABLE', `the files socket: ${err.code || err.message}`)));
    req.end(body);
  });
}

function checkedId(fileId) {
  if (typeof fileId !== 'string' || !/^[0-9a-fA-F-]{1,64}$/.test(fileId)) {
    throw new FilesError('INVALID_REQUEST', 'a file id is a string like "9b2f…" (from an upload or an earlier write)');
  }
  return fileId;
}

const fnrtModule = {
  files: {
    async read(fileId) {
      return filesCall('GET', `/api/v1/files/${checkedId(fileId)}`);
    },
    async info(fileId) {
      return JSON.parse((await filesCall('GET', `/api/v1/files/${checkedId(fileId)}/meta`)).toString('utf8'));
    },
    async write(data, options = {}) {
      const bytes = typeof data === 'string' ? Buffer.from(data, 'utf8') : Buffer.from(data);
      const name = typeof options.name === 'string' ? options.name : '';
      const answer = await filesCall('POST', `/api/v1/files?name=${encodeURIComponent(name)}`, bytes);
      return JSON.parse(answer.toString('utf8'));
    },
  },
};

/** Makes `require('fnrt')` give the helpers, from any of the function's files. */
function installFnrtModule() {
  const id = path.join(__dirname, 'fnrt.builtin.js');
  const builtin = new Module(id);
  builtin.filename = id;
  builtin.exports = fnrtModule;
  builtin.loaded = true;
  Module._cache[id] = builtin;
  const resolve = Module._resolveFilename;
  Module._resolveFilename = function resolveFnrt(request, ...rest) {
    if (request === 'fnrt') return id;
    return Reflect.apply(resolve, this, [request, ...rest]);
  };
}

// ---------------------------------------------------------------------------
// POST /run

function parseRun(body) {
  if (!isPlainObject(body)) throw new BadRequest('body must be a JSON object');
  const params = body.params === undefined ? {} : body.params;
  if (!isPlainObject(params)) throw new BadRequest('"params" must be a JSON object');
  const context = body.context === undefined ? {} : body.context;
  if (!isPlainObject(context)) throw new BadRequest('"context" must be a JSON object');
  // Informational only: the controller enforces the deadline by killing us.
  const deadline = body.deadline_ms;
  if (deadline !== undefined && deadline !== null && !(typeof deadline === 'number' && deadline >= 0)) {
    throw new BadRequest('"deadline_ms" must be a non-negative number');
  }
  const logMarker = body.log_marker;
  if (logMarker !== undefined && !(typeof logMarker === 'string' && LOG_MARKER_RE.test(logMarker))) {
    throw new BadRequest('"log_marker" must be a string of 16 to 64 characters from [A-Za-z0-9_-]');
  }
  const filesToken = body.files_token;
  if (filesToken !== undefined && !(typeof filesToken === 'string' && FILES_TOKEN_RE.test(filesToken))) {
    throw new BadRequest('"files_token" must be 64 lowercase hex characters');
  }
  return { params, context, logMarker, filesToken };
}

/** Serialises the handler's result: {json}, or {error} when JSON cannot represent it. */
function serialiseResult(value) {
  if (value === undefined) return { json: 'null' };
  let json;
  try {
    json = JSON.stringify(value);
  } catch (err) {
    const described = describeThrown(err, 'RUNTIME_ERROR');
    return { error: { ...described, code: 'RUNTIME_ERROR', message: `the result is not JSON-serialisable: ${described.message}` } };
  }
  if (json === undefined) {
    // A function or a symbol: JSON.stringify silently drops these.
    return {
      error: { code: 'RUNTIME_ERROR', message: `the result is not JSON-serialisable: the handler returned a ${typeof value}`, details: { type: 'TypeError' } },
    };
  }
  return { json };
}

async function handleRun(body) {
  if (state.phase !== 'initialized') {
    return [409, errorBody('NOT_INITIALIZED', 'POST /init has not succeeded on this instance')];
  }
  if (state.currentRun !== null) {
    return [409, errorBody('BUSY', 'a run is already in progress on this instance')];
  }

  let request;
  try {
    request = parseRun(body);
  } catch (err) {
    if (err instanceof BadRequest) return [400, errorBody('BAD_REQUEST', err.message)];
    throw err;
  }

  // The run ends at whichever comes first: the handler settles, or an uncaught
  // error/rejection is routed here by onStrayError.
  const run = { seq: ++state.runCount, filesToken: request.filesToken };
  const strayError = new Promise((resolve) => {
    run.fail = (err) => resolve({ thrown: err });
  });
  state.currentRun = run;
  try {
    // Inside runStore: everything the handler starts is known to be this run's.
    const called = runStore
      .run(run.seq, async () => ({
        value: await Reflect.apply(state.handler, state.exports, [request.params, request.context]),
      }))
      .catch((err) => ({ thrown: err }));
    const outcome = await Promise.race([called, strayError]);
    // Decided: a stray error from here on is only logged.
    run.fail = null;
    // Made inside the run: serialising may call the function's toJSON, which may print.
    return runAnswer(outcome);
  } finally {
    // Still busy meanwhile, so the next run's output cannot come before the
    // markers; until they are written, this run's late work may still log.
    // Without a marker, what the run wrote is in the pipes before the answer:
    // the controller reads them dry once it has the answer.
    if (request.logMarker !== undefined) await endLogs(request.logMarker);
    else if (outputQueued()) await writtenOut();
    state.currentRun = null;
  }
}

function runAnswer(outcome) {
  if ('thrown' in outcome) {
    const { code, message, details } = describeThrown(outcome.thrown, 'RUNTIME_ERROR');
    return [200, errorBody(code, message, details)];
  }
  const serialised = serialiseResult(outcome.value);
  if (serialised.error) {
    const { code, message, details } = serialised.error;
    return [200, errorBody(code, message, details)];
  }
  // Spliced in as text: the result has been serialised once already.
  return [200, `{"result":${serialised.json}}`];
}

/**
 * Ends a run's logs: once what the function wrote has reached the pipes,
 * writes `marker\n` to fd 1, then to fd 2, past process.stdout (which the
 * function may have replaced or patched). No newline goes before it: the
 * controller takes a line ending in the marker as the end.
 */
async function endLogs(marker) {
  await writtenOut();
  const line = Buffer.from(`${marker}\n`);
  await writeFully(1, line);
  await writeFully(2, line);
}

/** Whether process.stdout or process.stderr holds output a full pipe did not take yet. */
function outputQueued() {
  return state.stdio.some((stream) => stream.writableLength > 0 && !stream.destroyed);
}

/**
 * Waits until process.stdout and process.stderr have written what they queued:
 * Node makes a pipe non-blocking, and what it could not take at once waits in
 * the stream.
 */
async function writtenOut() {
  while (outputQueued()) await sleep(1);
}

/** Writes all of `buffer` to `fd`, waiting while a full pipe says EAGAIN; gives up on other errors. */
async function writeFully(fd, buffer) {
  let offset = 0;
  while (offset < buffer.length) {
    try {
      offset += fs.writeSync(fd, buffer, offset);
    } catch (err) {
      if (err.code !== 'EAGAIN') return; // a closed pipe: nobody reads it any more
      await sleep(1);
    }
  }
}

// ---------------------------------------------------------------------------
// HTTP plumbing

function errorBody(code, message, details) {
  const error = { code, message };
  if (details !== undefined) error.details = details;
  return { error };
}

/** Sends a JSON response; `payload` is an object or an already-serialised string. */
function sendJson(res, status, payload) {
  if (res.headersSent || res.destroyed) return;
  const body = Buffer.from(typeof payload === 'string' ? payload : JSON.stringify(payload));
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': body.length });
  res.end(body);
}

/**
 * Reads the whole body. Past MAX_BODY_BYTES it keeps reading but discards,
 * so the keep-alive connection stays usable, and resolves to null.
 */
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    let ended = false;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
      else chunks.length = 0;
    });
    req.on('end', () => {
      ended = true;
      resolve(size > MAX_BODY_BYTES ? null : Buffer.concat(chunks));
    });
    req.on('error', reject);
    req.on('close', () => {
      if (!ended) reject(new Error('client closed the connection mid-body'));
    });
  });
}

/** Reads and parses a JSON body; returns {body} or {response} when it is unusable. */
async function readJson(req) {
  const raw = await readBody(req);
  if (raw === null) {
    return { response: [400, errorBody('BAD_REQUEST', `request body exceeds ${MAX_BODY_BYTES} bytes`)] };
  }
  try {
    return { body: JSON.parse(raw.toString('utf8')) };
  } catch (err) {
    return { response: [400, errorBody('BAD_REQUEST', `body is not valid JSON: ${err.message}`)] };
  }
}

const ROUTES = {
  '/health': {
    GET: async (req) => {
      req.resume(); // a body on GET is ignored, but must be consumed for keep-alive
      if (state.warming) return [503, errorBody('STARTING', 'the runtime is warming up')];
      return [200, { status: 'ok', language: 'nodejs', runtime_version: process.version, initialized: state.phase === 'initialized' }];
    },
  },
  '/init': {
    POST: async (req) => {
      const { body, response } = await readJson(req);
      return response ?? handleInit(body);
    },
  },
  '/run': {
    POST: async (req) => {
      const { body, response } = await readJson(req);
      return response ?? handleRun(body);
    },
  },
};

async function onRequest(req, res) {
  const route = ROUTES[req.url.split('?')[0]];
  let status;
  let payload;
  try {
    if (route === undefined) {
      req.resume();
      [status, payload] = [404, errorBody('NOT_FOUND', `no route ${req.method} ${req.url}`)];
    } else if (route[req.method] === undefined) {
      req.resume();
      res.setHeader('Allow', Object.keys(route).join(', '));
      [status, payload] = [405, errorBody('METHOD_NOT_ALLOWED', `${req.url} does not accept ${req.method}`)];
    } else {
      [status, payload] = await route[req.method](req);
    }
  } catch (err) {
    if (req.destroyed) return; // the client went away; nobody to answer
    log(`internal error on ${req.method} ${req.url}: ${safeInspect(err)}`);
    [status, payload] = [500, errorBody('INTERNAL', 'internal runtime error')];
  }
  sendJson(res, status, payload);
}

/** Removes a socket file left by an earlier process; refuses to delete anything else. */
function removeStaleSocket(socketPath) {
  let stat;
  try {
    stat = fs.lstatSync(socketPath);
  } catch (err) {
    if (err.code === 'ENOENT') return;
    throw err;
  }
  if (!stat.isSocket()) throw new Error(`${socketPath} exists and is not a socket`);
  fs.unlinkSync(socketPath);
}

function main() {
  const { socketPath, warmUp: warm } = parseArgs(process.argv.slice(2));
  // Started to be /init-ed at once (a cold start): a warm-up would only delay it.
  state.warming = warm;
  state.stdio = [process.stdout, process.stderr];
  // Before /init, so the function's module sees the wrapped methods from its first line.
  for (const stream of state.stdio) dropLateWrites(stream);
  state.packageDir = path.join(path.dirname(path.resolve(socketPath)), 'function');
  state.filesSocket = path.join(path.dirname(path.resolve(socketPath)), 'files.sock');
  installFnrtModule();

  try {
    removeStaleSocket(socketPath);
  } catch (err) {
    log(`cannot use socket path: ${err.message}`);
    process.exit(1);
  }

  const server = http.createServer(onRequest);
  // The controller keeps one connection per instance for the instance's life,
  // and a run may last as long as its deadline: never time those out here.
  server.keepAliveTimeout = 0;
  server.requestTimeout = 0;
  server.timeout = 0;
  // Headers of one request still have to arrive promptly.
  server.headersTimeout = 60_000;

  server.on('error', (err) => {
    log(`server error: ${err.message}`);
    process.exit(1);
  });
  server.on('clientError', (err, socket) => {
    // Unparseable HTTP: answer 400 in the protocol's shape if the socket still can.
    if (socket.writable && !socket.destroyed) {
      const body = JSON.stringify(errorBody('BAD_REQUEST', `malformed HTTP request: ${err.code || err.message}`));
      socket.end(
        `HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
      );
    } else {
      socket.destroy();
    }
  });
  server.listen(socketPath, () => {
    (warm ? warmUp(socketPath) : Promise.resolve()).finally(() => {
      state.warming = false;
      // Not the path: stderr ends up in crash reports, which must not show host paths.
      log(`ready (node ${process.version}, pid ${process.pid})`);
    });
  });
}

/**
 * Goes once through what `/init` and `/run` do, before the controller hands
 * this instance out: V8 compiles each function on its first call, so the
 * first `/init` and the first run would otherwise pay for compiling their
 * own code paths, the body-reading and JSON path and the module loader's
 * (measured on the socket: 4 of a first /init's 6 ms; a first run 2.0-2.5
 * ms against 1.2 after this warm-up); initializing from the warm pool, and
 * the first execute after it, are what a caller waits for. A throwaway
 * function is initialised and run in a directory of its own (removed
 * again), then a POST /init that its checks refuse goes through the HTTP
 * path. Until it is done, /health answers 503 STARTING: the controller
 * counts the instance as started only after it. `--no-warm-up` (a cold
 * start, whose `/init` follows at once) skips it: the first `/init` compiles
 * that code anyway, and the warm-up would only come first.
 */
async function warmUp(socketPath) {
  let dir;
  try {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fnrt-warm-up-'));
    await initAndRunOnce(dir);
  } catch {
    // Only an optimisation: a read-only or missing temp dir changes nothing.
  } finally {
    if (dir !== undefined) fs.rmSync(dir, { recursive: true, force: true });
  }
  // The real function's directory, made now rather than in its /init.
  // (A package's files are placed elsewhere: state.packageDir.)
  try {
    const functionDir = path.resolve('function');
    prepareFunctionDir(functionDir);
    state.preparedDir = functionDir;
  } catch {
    // /init makes it then.
  }
  await new Promise((resolve) => {
    const body = JSON.stringify({ warm_up: true });
    const req = http.request(
      {
        socketPath,
        method: 'POST',
        path: '/init',
        headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) },
      },
      (res) => {
        res.resume();
        res.on('end', resolve);
        res.on('error', resolve);
      },
    );
    req.on('error', resolve);
    req.end(body);
  });
}

/**
 * The warm-up's /init and /run of a throwaway function in `dir`, then the
 * instance as it was: fresh, its environment back, the module forgotten.
 * Nothing else runs meanwhile: handleInit is synchronous and the run's
 * awaits settle in the same turn of the event loop (the handler awaits
 * nothing), so no request can see the throwaway function.
 */
async function initAndRunOnce(dir) {
  const env = { ...process.env };
  try {
    const [status] = handleInit(
      { entrypoint: 'index.js', handler: 'handler', code: WARM_UP_CODE, env: { FNRT_WARM_UP: '1' } },
      dir,
    );
    if (status === 200) await handleRun({ params: { warm_up: true }, context: {} });
  } finally {
    if (state.entryFile !== null) delete require.cache[state.entryFile];
    Object.assign(state, { phase: 'fresh', exports: null, handler: null, functionDir: null, entryFile: null });
    applyEnvironment(env);
  }
}

/** The warm-up's function: returns what it was given, as a run's result. */
const WARM_UP_CODE = 'exports.handler = async (params, context) => ({ params, context });\n';

main();
