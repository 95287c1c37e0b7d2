'use strict';
// Tests of the Node.js runtime server: each test starts the real server.js as
// a child process in a fresh instance directory, the way the controller does,
// and talks HTTP/1.1 to it over its Unix socket.
//
// Run: node --test runtimes/nodejs/test/

const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');
const { test } = require('node:test');

const SERVER = path.resolve(__dirname, '..', 'server.js');
const FUNCTIONS = path.resolve(__dirname, '..', '..', '..', 'functions');

function functionCode(name) {
  return fs.readFileSync(path.join(FUNCTIONS, name, 'index.js'), 'utf8');
}

/** 1-based line and column of `needle` in `code` (first occurrence). */
function positionOf(code, needle) {
  const lines = code.split('\n');
  const index = lines.findIndex((line) => line.includes(needle));
  assert.notEqual(index, -1, `${needle} not found`);
  return { line: index + 1, column: lines[index].indexOf(needle) + 1 };
}

/** Polls `condition` until it holds (or fails the test after 5 s). */
async function waitFor(condition) {
  const started = Date.now();
  while (!condition()) {
    if (Date.now() - started > 5000) throw new Error('timed out waiting for a condition');
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Sends one request over the socket; resolves to {status, headers, body (parsed JSON)}. */
function request(socketPath, method, urlPath, body, { agent, raw } = {}) {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : raw ? body : Buffer.from(JSON.stringify(body));
    const req = http.request(
      {
        socketPath,
        method,
        path: urlPath,
        agent,
        headers: payload === undefined ? {} : { 'Content-Type': 'application/json', 'Content-Length': payload.length },
      },
      (res) => {
        // Taken now: once the response ends, the agent may already have
        // reclaimed the socket and `res.socket` is null (seen under load).
        const socket = res.socket;
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          resolve({ status: res.statusCode, headers: res.headers, body: JSON.parse(text), socket });
        });
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

/**
 * Starts the server in a fresh instance directory with a scrubbed
 * environment plus one variable the function must never see.
 */
async function startServer(t, flags = []) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nodejs-runtime-test-'));
  fs.mkdirSync(path.join(dir, 'tmp'));
  const socketPath = path.join(dir, 'runtime.sock');
  const child = spawn(process.execPath, [SERVER, '--socket', socketPath, ...flags], {
    cwd: dir,
    env: { PATH: process.env.PATH, HOME: dir, LANG: 'C.UTF-8', TMPDIR: path.join(dir, 'tmp'), CONTROLLER_SECRET: 'do-not-leak' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c) => {
    output += c;
    stdout += c;
  });
  child.stderr.on('data', (c) => {
    output += c;
    stderr += c;
  });
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));

  // One keep-alive connection, as the controller uses.
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  t.after(async () => {
    agent.destroy();
    child.kill('SIGKILL');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
  });

  // Ready once /health answers.
  const started = Date.now();
  for (;;) {
    try {
      const res = await request(socketPath, 'GET', '/health', undefined, { agent: false });
      if (res.status === 200) break;
    } catch {
      // not listening yet
    }
    if (child.exitCode !== null) throw new Error(`server exited early:\n${output}`);
    if (Date.now() - started > 5000) throw new Error(`server not ready after 5 s:\n${output}`);
    await new Promise((r) => setTimeout(r, 20));
  }

  const call = (method, urlPath, body, options = {}) => request(socketPath, method, urlPath, body, { agent, ...options });
  return {
    dir,
    socketPath,
    child,
    output: () => output,
    stdout: () => stdout,
    stderr: () => stderr,
    call,
    init: (code, extra = {}) => call('POST', '/init', { language_title: 'nodejs-test', version: 1, entrypoint: 'index.js', handler: 'handler', code, env: {}, ...extra }),
    run: (params = {}, context = {}, options = {}) => call('POST', '/run', { params, context, deadline_ms: 30000 }, options),
  };
}

// ---------------------------------------------------------------------------
// Start-up and health

test('health answers before init with initialized false', async (t) => {
  const server = await startServer(t);
  const res = await server.call('GET', '/health');
  assert.equal(res.status, 200);
  assert.equal(res.headers['content-type'], 'application/json');
  assert.equal(Number(res.headers['content-length']), Buffer.byteLength(JSON.stringify(res.body)));
  assert.deepEqual(res.body, { status: 'ok', language: 'nodejs', runtime_version: process.version, initialized: false });
});

test('the start-up warm-up leaves nothing behind and the instance stays fresh', async (t) => {
  // Ready (/health 200) only once the warm-up is over.
  const server = await startServer(t);
  // Its throwaway function's directory is gone, and its /init and /run (the
  // throwaway's, then a refused one) counted for nothing. The real
  // function's directory is made, holding only the CommonJS pin.
  assert.deepEqual(fs.readdirSync(path.join(server.dir, 'tmp')), []);
  assert.deepEqual(fs.readdirSync(path.join(server.dir, 'function')), ['package.json']);
  assert.equal((await server.call('GET', '/health')).body.initialized, false);
  assert.equal((await server.run()).status, 409);
  const code = `exports.handler = async () => ({
    env: Object.keys(process.env).filter((k) => !['PATH', 'HOME', 'LANG', 'TMPDIR'].includes(k)),
    modules: Object.keys(require.cache).filter((k) => k.includes('warm-up')),
  });`;
  assert.equal((await server.init(code, { env: { ONLY_MINE: 'yes' } })).status, 200);
  // The function sees its own environment only, and no module of the warm-up's.
  assert.deepEqual((await server.run()).body, { result: { env: ['ONLY_MINE'], modules: [] } });
});

test('a function compiled from its /init body is a module like a required one, and its file is there', async (t) => {
  for (const flags of [[], ['--no-warm-up']]) {
    const server = await startServer(t, flags);
    const code = `const fs = require('fs');
const self = fs.readFileSync(__filename, 'utf8');
exports.handler = async () => ({
  readsItself: self.startsWith('const fs'),
  file: require('path').relative(process.cwd(), __filename),
  sameModule: require(__filename) === module.exports && require.cache[__filename] === module,
  loaded: module.loaded,
  pin: JSON.parse(fs.readFileSync(require('path').join(__dirname, 'package.json'), 'utf8')).type,
});`;
    assert.equal((await server.init(code)).status, 200, flags.join(' '));
    assert.deepEqual((await server.run()).body, {
      result: { readsItself: true, file: 'function/index.js', sameModule: true, loaded: true, pin: 'commonjs' },
    });
  }
});

test('with --no-warm-up (a cold start) the first /health already answers 200, and /init works', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nodejs-runtime-test-'));
  fs.mkdirSync(path.join(dir, 'tmp'));
  const socketPath = path.join(dir, 'runtime.sock');
  const child = spawn(process.execPath, [SERVER, '--socket', socketPath, '--no-warm-up'], {
    cwd: dir,
    env: { PATH: process.env.PATH, HOME: dir, LANG: 'C.UTF-8', TMPDIR: path.join(dir, 'tmp') },
    stdio: 'ignore',
  });
  t.after(() => {
    child.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });
  // Asked as soon as it accepts: a warm-up would still be running then (503 STARTING).
  let first;
  for (let i = 0; i < 5000 && first === undefined; i++) {
    first = await request(socketPath, 'GET', '/health', undefined, { agent: false }).catch(() => undefined);
    if (first === undefined) await new Promise((r) => setTimeout(r, 1));
  }
  assert.equal(first?.status, 200, JSON.stringify(first?.body));
  const init = await request(socketPath, 'POST', '/init', {
    language_title: 'nodejs-test',
    version: 1,
    entrypoint: 'index.js',
    handler: 'handler',
    code: 'exports.handler = async (p) => p.n + 1;',
    env: {},
  });
  assert.equal(init.status, 200);
  const run = await request(socketPath, 'POST', '/run', { params: { n: 41 }, context: {}, deadline_ms: 30000 });
  assert.deepEqual(run.body, { result: 42 });
});

test('unknown flags exit with code 2', async () => {
  const child = spawn(process.execPath, [SERVER, '--socket', '/tmp/unused.sock', '--port', '8080'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (c) => (stderr += c));
  const code = await new Promise((resolve) => child.on('exit', resolve));
  assert.equal(code, 2);
  assert.match(stderr, /unknown argument: --port/);
});

test('a stale socket file is replaced', async (t) => {
  const first = await startServer(t);
  // Kill without cleanup: the socket file stays behind.
  first.child.kill('SIGKILL');
  await new Promise((r) => first.child.on('exit', r));
  assert.ok(fs.existsSync(first.socketPath));

  const child = spawn(process.execPath, [SERVER, '--socket', first.socketPath], { cwd: first.dir, stdio: 'ignore' });
  t.after(() => child.kill('SIGKILL'));
  let res;
  for (let i = 0; i < 250 && res === undefined; i++) {
    res = await request(first.socketPath, 'GET', '/health', undefined, { agent: false }).catch(() => undefined);
    if (res?.status === 503) {
      // Still warming up (see warmUp in server.js): not ready yet.
      assert.equal(res.body.error.code, 'STARTING');
      res = undefined;
    }
    if (res === undefined) await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(res?.status, 200);
});

// ---------------------------------------------------------------------------
// /init

test('init loads the function once and refuses a second init', async (t) => {
  const server = await startServer(t);
  const first = await server.init(functionCode('nodejs-calculator'));
  assert.equal(first.status, 200);
  assert.deepEqual(first.body, { status: 'initialized' });
  assert.equal(fs.readFileSync(path.join(server.dir, 'function', 'index.js'), 'utf8'), functionCode('nodejs-calculator'));

  const health = await server.call('GET', '/health');
  assert.equal(health.body.initialized, true);

  const second = await server.init(functionCode('nodejs-calculator'));
  assert.equal(second.status, 409);
  assert.equal(second.body.error.code, 'ALREADY_INITIALIZED');
});

test('run before init is 409 NOT_INITIALIZED', async (t) => {
  const server = await startServer(t);
  const res = await server.run({ operation: 'add', values: [1] });
  assert.equal(res.status, 409);
  assert.equal(res.body.error.code, 'NOT_INITIALIZED');
});

test('a syntax error is 422 INIT_ERROR with line and column', async (t) => {
  const server = await startServer(t);
  const code = "'use strict';\n\nmodule.exports.handler = () => {\n  return 1 +;\n};\n";
  const res = await server.init(code);
  assert.equal(res.status, 422);
  assert.equal(res.body.error.code, 'INIT_ERROR');
  assert.equal(res.body.error.details.type, 'SyntaxError');
  assert.equal(res.body.error.details.line, 4);
  assert.equal(res.body.error.details.column, positionOf(code, '+;').column + 1); // at the ';'
  assert.ok(!res.body.error.details.stack_trace.includes(server.dir), res.body.error.details.stack_trace);
  assert.match(res.body.error.details.stack_trace, /^index\.js:4\n/);
});

test('a throw at module top level is 422 INIT_ERROR pointing at the throw', async (t) => {
  const server = await startServer(t);
  const code = "const x = 1;\nthrow new RangeError('bad config');\n";
  const res = await server.init(code);
  assert.equal(res.status, 422);
  assert.equal(res.body.error.code, 'INIT_ERROR');
  assert.equal(res.body.error.message, 'bad config');
  assert.equal(res.body.error.details.type, 'RangeError');
  assert.equal(res.body.error.details.line, 2);
  assert.equal(res.body.error.details.column, 7);
});

test('a missing or non-function handler is 422 INIT_ERROR, and the instance stays unusable', async (t) => {
  const missing = await startServer(t);
  let res = await missing.init('module.exports.other = () => 1;\n');
  assert.equal(res.status, 422);
  assert.equal(res.body.error.code, 'INIT_ERROR');
  assert.match(res.body.error.message, /does not export "handler"/);

  const builtin = await startServer(t);
  res = await builtin.init('module.exports = {};\n', { handler: 'toString' });
  assert.equal(res.status, 422);

  const notFunction = await startServer(t);
  res = await notFunction.init('module.exports.handler = 42;\n');
  assert.equal(res.status, 422);
  assert.match(res.body.error.message, /not a function/);

  // After a failed init the instance is done: no second init, no runs.
  res = await notFunction.init('module.exports.handler = () => 1;\n');
  assert.equal(res.status, 409);
  assert.equal(res.body.error.code, 'ALREADY_INITIALIZED');
  res = await notFunction.run();
  assert.equal(res.status, 409);
  assert.equal(res.body.error.code, 'NOT_INITIALIZED');
});

test('error messages and stack traces do not leak host paths', async (t) => {
  const server = await startServer(t);
  const code = "require('./missing-module');\nmodule.exports.handler = () => 1;\n";
  const res = await server.init(code);
  assert.equal(res.status, 422);
  const text = JSON.stringify(res.body);
  assert.match(res.body.error.message, /Cannot find module '\.\/missing-module'/);
  assert.ok(!text.includes(server.dir), text);
  assert.ok(!text.includes(path.dirname(SERVER)), text);
  assert.equal(res.body.error.details.line, 1);

  const other = await startServer(t);
  const cwdCode = "module.exports.handler = () => { throw new Error(`cwd is ${process.cwd()}, file is ${__filename}`); };";
  assert.equal((await other.init(cwdCode)).status, 200);
  const run = await other.run();
  assert.equal(run.body.error.message, 'cwd is ., file is index.js');
});

test('init refuses entrypoints that are not plain file names', async (t) => {
  const server = await startServer(t);
  for (const entrypoint of ['..', '.', '../escape.js', 'dir/index.js', '', 'a'.repeat(65), 42]) {
    const res = await server.init('module.exports.handler = () => 1;', { entrypoint });
    assert.equal(res.status, 400, `entrypoint ${JSON.stringify(entrypoint)}`);
    assert.equal(res.body.error.code, 'BAD_REQUEST');
  }
  // The refusals did not use up the instance.
  const res = await server.init('module.exports.handler = () => 1;');
  assert.equal(res.status, 200);
});

test('init refuses bodies with wrong types', async (t) => {
  const server = await startServer(t);
  const cases = [
    { entrypoint: 'index.js', handler: 'handler' }, // no code
    { entrypoint: 'index.js', handler: 7, code: '' },
    { entrypoint: 'index.js', handler: 'handler', code: '', env: { A: 1 } },
    { entrypoint: 'index.js', handler: 'handler', code: '', env: ['A'] },
  ];
  for (const body of cases) {
    const res = await server.call('POST', '/init', body);
    assert.equal(res.status, 400, JSON.stringify(body));
    assert.equal(res.body.error.code, 'BAD_REQUEST');
  }
});

test('the function sees exactly its declared env plus PATH, HOME, LANG and TMPDIR', async (t) => {
  const server = await startServer(t);
  const code = 'const atLoad = { ...process.env };\nmodule.exports.handler = () => ({ atLoad, atRun: { ...process.env } });\n';
  const init = await server.init(code, { env: { GREETING: 'hello', EMPTY: '' } });
  assert.equal(init.status, 200);
  const res = await server.run();
  assert.equal(res.status, 200);
  const expected = {
    EMPTY: '',
    GREETING: 'hello',
    HOME: server.dir,
    LANG: 'C.UTF-8',
    PATH: process.env.PATH,
    TMPDIR: path.join(server.dir, 'tmp'),
  };
  assert.deepEqual(res.body.result.atLoad, expected);
  assert.deepEqual(res.body.result.atRun, expected);
});

// ---------------------------------------------------------------------------
// /run

test('runs the calculator function', async (t) => {
  const server = await startServer(t);
  assert.equal((await server.init(functionCode('nodejs-calculator'))).status, 200);
  const cases = [
    [{ operation: 'add', values: [1, 2, 3] }, 6],
    [{ operation: 'subtract', values: [10, 2, 3] }, 5],
    [{ operation: 'multiply', values: [2, 3, 4] }, 24],
    [{ operation: 'divide', values: [100, 5, 2] }, 10],
  ];
  for (const [params, value] of cases) {
    // Same keep-alive connection for every call.
    const res = await server.run(params, { environment: 'test', user_id: 'user-123' });
    assert.equal(res.status, 200);
    assert.deepEqual(res.body, { result: { value } }, JSON.stringify(params));
  }
});

test('the calculator examples in function.json hold', async (t) => {
  const server = await startServer(t);
  assert.equal((await server.init(functionCode('nodejs-calculator'))).status, 200);
  const manifest = JSON.parse(fs.readFileSync(path.join(FUNCTIONS, 'nodejs-calculator', 'function.json'), 'utf8'));
  for (const example of manifest.examples) {
    const res = await server.run(example.request.params);
    if ('error' in example.response) {
      // Error examples show code and message; details (stack and all) are not spelled out.
      const { code, message } = res.body.error;
      assert.deepEqual({ error: { code, message } }, example.response, example.description);
    } else {
      assert.deepEqual(res.body, example.response, example.description);
    }
  }
});

test('an error with code INVALID_PARAMS maps to INVALID_PARAMS', async (t) => {
  const server = await startServer(t);
  assert.equal((await server.init(functionCode('nodejs-calculator'))).status, 200);
  const res = await server.run({ operation: 'divide', values: [1, 0] });
  assert.equal(res.status, 200);
  assert.equal(res.body.error.code, 'INVALID_PARAMS');
  assert.match(res.body.error.message, /Division by zero/);
  assert.equal(res.body.error.details.type, 'Error');
});

test('a thrown error carries type, message, line, column and a scrubbed stack trace', async (t) => {
  const server = await startServer(t);
  const code = functionCode('nodejs-error');
  assert.equal((await server.init(code)).status, 200);

  let res = await server.run({});
  assert.equal(res.status, 200);
  const { error } = res.body;
  assert.equal(error.code, 'RUNTIME_ERROR');
  assert.equal(error.message, "Cannot read properties of undefined (reading 'level')");
  assert.equal(error.details.type, 'TypeError');
  const where = positionOf(code, 'level;');
  assert.equal(error.details.line, where.line);
  assert.equal(error.details.column, where.column);
  assert.ok(error.details.stack_trace.includes(`at readSetting (index.js:${where.line}:${where.column})`), error.details.stack_trace);
  assert.ok(!error.details.stack_trace.includes(server.dir), error.details.stack_trace);
  assert.ok(!error.details.stack_trace.includes(SERVER), error.details.stack_trace);

  res = await server.run({ message: 'custom failure' });
  assert.equal(res.body.error.message, 'custom failure');
  assert.equal(res.body.error.details.type, 'Error');
  assert.deepEqual(
    { line: res.body.error.details.line, column: res.body.error.details.column },
    positionOf(code, 'new Error(params.message)'),
  );

  // The error examples in function.json match what the runtime answers.
  const manifest = JSON.parse(fs.readFileSync(path.join(FUNCTIONS, 'nodejs-error', 'function.json'), 'utf8'));
  for (const example of manifest.examples) {
    const got = (await server.run(example.request.params)).body.error;
    const want = example.response.error;
    assert.equal(got.code, want.code);
    assert.equal(got.message, want.message);
    for (const [key, value] of Object.entries(want.details)) assert.equal(got.details[key], value, `${example.description}: ${key}`);
  }
});

test('thrown non-Error values still give a clean RUNTIME_ERROR', async (t) => {
  const server = await startServer(t);
  const code = [
    'module.exports.handler = ({ kind }) => {',
    "  if (kind === 'string') throw 'plain string';",
    "  if (kind === 'number') throw 42;",
    "  if (kind === 'null') throw null;",
    "  if (kind === 'undefined') throw undefined;",
    "  if (kind === 'object') throw { reason: 'nope' };",
    "  if (kind === 'invalid') throw { code: 'INVALID_PARAMS', message: 'bad input' };",
    "  if (kind === 'empty') throw new Error();",
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  const expectations = {
    string: ['RUNTIME_ERROR', 'plain string', 'string'],
    number: ['RUNTIME_ERROR', '42', 'number'],
    null: ['RUNTIME_ERROR', 'null', 'null'],
    undefined: ['RUNTIME_ERROR', 'undefined', 'undefined'],
    object: ['RUNTIME_ERROR', '{"reason":"nope"}', 'Object'],
    invalid: ['INVALID_PARAMS', 'bad input', 'Object'],
    empty: ['RUNTIME_ERROR', 'Error thrown with an empty message', 'Error'],
  };
  for (const [kind, [errorCode, message, type]] of Object.entries(expectations)) {
    const res = await server.run({ kind });
    assert.equal(res.status, 200, kind);
    assert.deepEqual([res.body.error.code, res.body.error.message, res.body.error.details.type], [errorCode, message, type], kind);
  }
});

test('an async handler is awaited', async (t) => {
  const server = await startServer(t);
  const code = [
    "const { setTimeout: sleep } = require('node:timers/promises');",
    'module.exports.handler = async (params, context) => {',
    '  await sleep(30);',
    '  return { echo: params, context };',
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  const res = await server.run({ a: [1, 'two', null] }, { user_id: 'u1' });
  assert.deepEqual(res.body, { result: { echo: { a: [1, 'two', null] }, context: { user_id: 'u1' } } });
});

test('an async rejection reports the line of the throw', async (t) => {
  const server = await startServer(t);
  const code = "module.exports.handler = async () => {\n  await null;\n  throw new Error('later');\n};\n";
  assert.equal((await server.init(code)).status, 200);
  const res = await server.run();
  assert.equal(res.body.error.code, 'RUNTIME_ERROR');
  assert.equal(res.body.error.details.line, 3);
  assert.equal(res.body.error.details.column, 9);
});

test('undefined becomes null and unserialisable results are RUNTIME_ERROR', async (t) => {
  const server = await startServer(t);
  const code = [
    'module.exports.handler = ({ kind }) => {',
    "  if (kind === 'undefined') return undefined;",
    "  if (kind === 'bigint') return { n: 10n };",
    "  if (kind === 'cycle') { const a = {}; a.self = a; return a; }",
    "  if (kind === 'function') return () => 1;",
    "  if (kind === 'string') return 'text';",
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  assert.deepEqual((await server.run({ kind: 'undefined' })).body, { result: null });
  assert.deepEqual((await server.run({ kind: 'string' })).body, { result: 'text' });
  for (const kind of ['bigint', 'cycle', 'function']) {
    const res = await server.run({ kind });
    assert.equal(res.status, 200, kind);
    assert.equal(res.body.error.code, 'RUNTIME_ERROR', kind);
    assert.match(res.body.error.message, /not JSON-serialisable/, kind);
  }
});

test('malformed and mistyped run bodies are 400 BAD_REQUEST', async (t) => {
  const server = await startServer(t);
  assert.equal((await server.init('module.exports.handler = () => 1;')).status, 200);
  const bodies = ['{"params":', 'not json', '[]', '{"params":[1]}', '{"params":{},"context":"x"}', '{"deadline_ms":"soon"}'];
  for (const body of bodies) {
    const res = await server.call('POST', '/run', Buffer.from(body), { raw: true });
    assert.equal(res.status, 400, body);
    assert.equal(res.body.error.code, 'BAD_REQUEST', body);
  }
  // The connection and the instance are still fine.
  assert.deepEqual((await server.run()).body, { result: 1 });
});

test('a body over 16 MiB is refused and the connection stays usable', async (t) => {
  const server = await startServer(t);
  const big = Buffer.alloc(16 * 1024 * 1024 + 1, 0x20);
  const res = await server.call('POST', '/init', big, { raw: true });
  assert.equal(res.status, 400);
  assert.equal(res.body.error.code, 'BAD_REQUEST');
  assert.match(res.body.error.message, /exceeds/);
  const health = await server.call('GET', '/health');
  assert.equal(health.status, 200);
  assert.equal(health.socket, res.socket, 'same keep-alive connection');
});

test('a second run while one is in progress is 409 BUSY', async (t) => {
  const server = await startServer(t);
  const code = [
    "const fs = require('node:fs');",
    "const { setTimeout: sleep } = require('node:timers/promises');",
    'module.exports.handler = async ({ ms }) => {',
    "  fs.writeFileSync('started', ''); // tells the test the run has begun",
    '  await sleep(ms);',
    '  return { slept: ms };',
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);

  const slow = server.run({ ms: 1000 });
  await waitFor(() => fs.existsSync(path.join(server.dir, 'started')));
  // A second connection: the first one is occupied by the slow run.
  const busy = await server.run({ ms: 0 }, {}, { agent: false });
  assert.equal(busy.status, 409);
  assert.equal(busy.body.error.code, 'BUSY');

  assert.deepEqual((await slow).body, { result: { slept: 1000 } });
  // Once it is done, runs are accepted again.
  assert.deepEqual((await server.run({ ms: 0 })).body, { result: { slept: 0 } });
});

test('an unhandled rejection during a run becomes that run\'s error', async (t) => {
  const server = await startServer(t);
  const code = [
    'module.exports.handler = () => new Promise((resolve) => {',
    "  Promise.reject(new Error('forgotten promise'));",
    '  setTimeout(resolve, 1000);',
    '});',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  const res = await server.run();
  assert.equal(res.body.error.code, 'RUNTIME_ERROR');
  assert.equal(res.body.error.message, 'forgotten promise');
  assert.equal(res.body.error.details.line, 2);
});

test('an uncaught exception outside a run is logged and the server keeps serving', async (t) => {
  const server = await startServer(t);
  const code = [
    "setTimeout(() => { throw new Error('stray timer'); }, 10);",
    'module.exports.handler = () => 1;',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  await waitFor(() => server.output().includes('stray timer'));
  assert.deepEqual((await server.run()).body, { result: 1 });
  assert.match(server.output(), /uncaught exception outside a run: .*stray timer/);
  assert.ok(!server.output().includes(server.dir), 'no host path in the log');
});

test('a stray error of no run during a run becomes that run\'s error', async (t) => {
  const server = await startServer(t);
  // Set at /init, outside any run: the run in progress is the most likely culprit.
  const code = [
    "setTimeout(() => { throw new Error('module timer'); }, 300);",
    'module.exports.handler = () => new Promise(() => {});',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  const res = await server.run();
  assert.equal(res.body.error.code, 'RUNTIME_ERROR');
  assert.equal(res.body.error.message, 'module timer');
});

test('a stray error left behind by an earlier run is not answered to a later run', async (t) => {
  const server = await startServer(t);
  const code = [
    "const { setTimeout: sleep } = require('node:timers/promises');",
    'const fired = [];',
    'let firedDuringRun2 = null;',
    'module.exports.handler = async (params) => {',
    '  if (params.run === 1) {',
    "    setTimeout(() => { fired.push('throw'); throw new Error('secret of run 1'); }, 200);",
    "    setTimeout(() => { fired.push('reject'); return Promise.reject(new Error('rejected secret of run 1')); }, 200);",
    "    return 'first';",
    '  }',
    '  if (params.run === 2) {',
    '    await sleep(600);',
    '    firedDuringRun2 = fired.slice();',
    '    return { ok: true };',
    '  }',
    '  return firedDuringRun2;',
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  const first = 'fnrt-log-end-run-one-00000000';
  const second = 'fnrt-log-end-run-two-00000000';
  assert.deepEqual((await runMarked(server, { run: 1 }, first)).body, { result: 'first' });
  // Run 2 starts as soon as run 1 has answered; run 1's timers fire while it is in progress.
  const res = await runMarked(server, { run: 2 }, second);
  assert.deepEqual(res.body, { result: { ok: true } });
  assert.ok(!JSON.stringify(res.body).includes('secret'), JSON.stringify(res.body));
  // Both did go off during run 2, so the answer above is not vacuous.
  assert.deepEqual((await server.run({ run: 3 })).body, { result: ['throw', 'reject'] });

  const window = (text) => text.split(`${first}\n`)[1].split(second)[0];
  assert.ok(!window(server.stdout()).includes('secret'), JSON.stringify(server.stdout()));
  assert.ok(!window(server.stderr()).includes('secret'), JSON.stringify(server.stderr()));
  assert.ok(!server.output().includes('secret'), JSON.stringify(server.output()));
});

test('a stray error of an earlier run while no run is in progress is dropped', async (t) => {
  const server = await startServer(t);
  const code = [
    "const fs = require('node:fs');",
    'module.exports.handler = (params) => {',
    '  if (params.run === 1) {',
    "    setTimeout(() => { fs.writeFileSync('threw', ''); throw new Error('secret of run 1'); }, 100);",
    "    setTimeout(() => { fs.writeFileSync('rejected', ''); return Promise.reject(new Error('rejected secret of run 1')); }, 100);",
    '  }',
    '  return params.run;',
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  assert.deepEqual((await server.run({ run: 1 })).body, { result: 1 });
  await waitFor(() => fs.existsSync(path.join(server.dir, 'threw')) && fs.existsSync(path.join(server.dir, 'rejected')));
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual((await server.run({ run: 2 })).body, { result: 2 });
  assert.ok(!server.output().includes('secret'), JSON.stringify(server.output()));
});

test('module state survives between runs (the counter function)', async (t) => {
  const server = await startServer(t);
  assert.equal((await server.init(functionCode('nodejs-counter'))).status, 200);
  assert.deepEqual((await server.run()).body, { result: { count: 1 } });
  assert.deepEqual((await server.run()).body, { result: { count: 2 } });
  assert.deepEqual((await server.run({ step: 5 })).body, { result: { count: 7 } });
  assert.equal((await server.run({ step: 1.5 })).body.error.code, 'INVALID_PARAMS');
});

test('the server writes nothing to stdout and the function owns it', async (t) => {
  const server = await startServer(t);
  const code = "module.exports.handler = () => { console.log('from the function'); return null; };";
  assert.equal((await server.init(code)).status, 200);
  await server.run();
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(server.stdout(), 'from the function\n');
});

// ---------------------------------------------------------------------------
// log_marker

const MARKER = 'fnrt-log-end-0123456789abcdef';

/** A run with `log_marker`; waits until the marker has come through both pipes. */
async function runMarked(server, params = {}, marker = MARKER) {
  const res = await server.call('POST', '/run', { params, context: {}, deadline_ms: 30000, log_marker: marker });
  await waitFor(() => server.stdout().endsWith(`${marker}\n`) && server.stderr().endsWith(`${marker}\n`));
  return res;
}

function count(text, needle) {
  return text.split(needle).length - 1;
}

test('a run with a log_marker ends with it on stdout and stderr, after all the function wrote', async (t) => {
  const server = await startServer(t);
  const code = "module.exports.handler = () => { console.log('a'); process.stdout.write('partial'); console.error('b'); return 1; };";
  assert.equal((await server.init(code)).status, 200);
  const res = await runMarked(server);
  assert.deepEqual(res.body, { result: 1 });
  // No newline of the runtime's before the marker: "partial" is the run's last, unterminated line.
  assert.ok(server.stdout().endsWith(`a\npartial${MARKER}\n`), JSON.stringify(server.stdout()));
  assert.ok(server.stderr().endsWith(`b\n${MARKER}\n`), JSON.stringify(server.stderr()));
});

test('every outcome of a run ends its logs with the marker', async (t) => {
  const server = await startServer(t);
  const code = [
    'module.exports.handler = ({ kind }) => {',
    '  console.log(`out ${kind}`);',
    "  if (kind === 'throw') throw new TypeError('bad');",
    "  if (kind === 'invalid') throw Object.assign(new Error('no'), { code: 'INVALID_PARAMS' });",
    "  if (kind === 'bigint') return 10n;",
    "  if (kind === 'stray') { setImmediate(() => { throw new Error('stray'); }); return new Promise(() => {}); }",
    "  if (kind === 'tojson') return { toJSON() { console.log('in toJSON'); return 'j'; } };",
    '  return kind;',
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  const expected = {
    value: [{ result: 'value' }],
    throw: ['RUNTIME_ERROR', 'bad'],
    invalid: ['INVALID_PARAMS', 'no'],
    bigint: ['RUNTIME_ERROR', /not JSON-serialisable/],
    stray: ['RUNTIME_ERROR', 'stray'],
    tojson: [{ result: 'j' }],
  };
  for (const [kind, want] of Object.entries(expected)) {
    const marker = `marker-${kind}-`.padEnd(24, 'x');
    const res = await runMarked(server, { kind }, marker);
    assert.equal(res.status, 200, kind);
    if (want.length === 1) {
      assert.deepEqual(res.body, want[0], kind);
    } else {
      assert.equal(res.body.error.code, want[0], kind);
      if (want[1] instanceof RegExp) assert.match(res.body.error.message, want[1], kind);
      else assert.equal(res.body.error.message, want[1], kind);
    }
    const tail = kind === 'tojson' ? `out ${kind}\nin toJSON\n${marker}\n` : `out ${kind}\n${marker}\n`;
    assert.ok(server.stdout().endsWith(tail), `${kind}: ${JSON.stringify(server.stdout())}`);
    assert.equal(count(server.stdout(), marker), 1, kind);
    assert.equal(count(server.stderr(), marker), 1, kind);
  }
});

test('the marker gets past a replaced process.stdout.write and process.stderr.write', async (t) => {
  const server = await startServer(t);
  const code = [
    'module.exports.handler = () => {',
    '  process.stdout.write = () => true;',
    '  process.stderr.write = () => true;',
    "  console.log('swallowed');",
    '  return null;',
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  await runMarked(server);
  assert.equal(server.stdout(), `${MARKER}\n`);
  assert.ok(!server.output().includes('swallowed'));
});

test('output a full pipe made Node queue comes before the marker', async (t) => {
  const server = await startServer(t);
  // Far more than a pipe holds: most of it waits in process.stdout when the handler returns.
  const code = "module.exports.handler = () => { process.stdout.write('x'.repeat(1 << 20) + '\\n'); return 1; };";
  assert.equal((await server.init(code)).status, 200);
  await runMarked(server);
  assert.equal(server.stdout(), `${'x'.repeat(1 << 20)}\n${MARKER}\n`);
});

test('a malformed log_marker is 400 BAD_REQUEST and runs nothing', async (t) => {
  const server = await startServer(t);
  assert.equal((await server.init("module.exports.handler = () => { console.log('ran'); return 1; };")).status, 200);
  for (const marker of ['a'.repeat(15), 'a'.repeat(65), `${'a'.repeat(16)}\n`, `${'a'.repeat(16)}!`, 'é'.repeat(16), 42, null, ['a'.repeat(16)]]) {
    const res = await server.call('POST', '/run', { params: {}, log_marker: marker });
    assert.equal(res.status, 400, JSON.stringify(marker));
    assert.equal(res.body.error.code, 'BAD_REQUEST');
    assert.match(res.body.error.message, /"log_marker" must be a string of 16 to 64 characters/);
  }
  // The bounds themselves are fine.
  for (const marker of ['a'.repeat(16), `${'Z9_-'.repeat(16)}`]) {
    assert.deepEqual((await runMarked(server, {}, marker)).body, { result: 1 });
  }
  assert.equal(count(server.stdout(), 'ran\n'), 2);
});

test('without a log_marker nothing is written besides the function\'s output', async (t) => {
  const server = await startServer(t);
  const code = "module.exports.handler = () => { process.stdout.write('no newline'); console.error('err'); return 1; };";
  assert.equal((await server.init(code)).status, 200);
  await server.run();
  await server.run();
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(server.stdout(), 'no newlineno newline');
  assert.ok(server.stderr().endsWith('err\nerr\n'), JSON.stringify(server.stderr()));
});

test('without a log_marker, output a full pipe made Node queue is written out before the answer', async (t) => {
  const server = await startServer(t);
  // Far more than a pipe holds, and nobody reads the pipe for a while.
  const code = "module.exports.handler = () => { process.stdout.write('x'.repeat(1 << 20) + '\\n'); return 1; };";
  assert.equal((await server.init(code)).status, 200);
  server.child.stdout.pause();
  let answered = false;
  const run = server.run().then((res) => {
    answered = true;
    return res;
  });
  await new Promise((r) => setTimeout(r, 300));
  // The controller reads the pipes dry once it has the answer: an answer now would cut the output.
  assert.equal(answered, false, 'answered while its output still waited in process.stdout');
  server.child.stdout.resume();
  assert.deepEqual((await run).body, { result: 1 });
  await waitFor(() => server.stdout().length === (1 << 20) + 1);
});

test('a write left behind by an earlier run is dropped from a later run\'s logs', async (t) => {
  const server = await startServer(t);
  const code = [
    "const { setTimeout: sleep } = require('node:timers/promises');",
    // Set at /init, outside any run: what it writes carries no run's data and passes.
    'let fromModule = false;',
    "setInterval(() => { if (fromModule) { fromModule = false; console.log('from module load'); } }, 20).unref();",
    'const late = { called: false, returned: null };',
    'module.exports.handler = async (params) => {',
    '  if (params.run === 1) {',
    "    console.log('first');",
    "    setTimeout(() => console.log('late from ' + params.who), 200);",
    "    setTimeout(() => console.error('late stderr from ' + params.who), 200);",
    '    setTimeout(() => {',
    "      late.returned = process.stdout.write('late write from ' + params.who + '\\n', () => { late.called = true; });",
    '    }, 200);',
    "    sleep(200).then(() => console.log('late promise from ' + params.who));",
    "    return 'first';",
    '  }',
    '  fromModule = true;',
    '  await sleep(600);',
    "  console.log('second');",
    '  return late;',
    '};',
  ].join('\n');
  assert.equal((await server.init(code)).status, 200);
  const first = 'fnrt-log-end-run-one-00000000';
  const second = 'fnrt-log-end-run-two-00000000';
  assert.deepEqual((await runMarked(server, { run: 1, who: 'alice' }, first)).body, { result: 'first' });
  // Run 2 starts as soon as run 1 has answered; run 1's timers fire while it is in progress.
  const res = await runMarked(server, { run: 2, who: 'bob' }, second);
  // Dropped as if written: true, and the callback was called.
  assert.deepEqual(res.body, { result: { called: true, returned: true } });

  const window = (text) => text.split(`${first}\n`)[1].split(second)[0];
  assert.ok(server.stdout().startsWith(`first\n${first}\n`), JSON.stringify(server.stdout()));
  const out = window(server.stdout());
  assert.ok(out.includes('second\n'), JSON.stringify(out));
  assert.ok(out.includes('from module load\n'), JSON.stringify(out));
  assert.ok(!out.includes('late'), JSON.stringify(out));
  assert.ok(!window(server.stderr()).includes('late'), JSON.stringify(server.stderr()));
  assert.ok(!server.output().includes('alice'), JSON.stringify(server.output()));
});
