"""Tests of the Python runtime server, through its real wire protocol.

Each test starts `server.py` as a subprocess (with the interpreter running the
tests) in a fresh instance directory, and talks HTTP/1.1 to it over its Unix
socket, as the controller does.

    python3 -m unittest discover -s runtimes/python -p 'test_*.py'
"""

import http.client
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = pathlib.Path(__file__).resolve().parent
SERVER = HERE / "server.py"
FUNCTIONS = HERE.parent.parent / "functions"
SYSTEM_PYTHON = "/usr/bin/python3"


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX socket (the host name is only for the Host header)."""

    def __init__(self, path, timeout=10):
        super().__init__("runtime", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def function_source(name):
    """(entrypoint, code, handler) of a bundled function folder."""
    folder = FUNCTIONS / name
    manifest = json.loads((folder / "function.json").read_text())
    code = (folder / manifest["entrypoint"]).read_text()
    return manifest["entrypoint"], code, manifest.get("handler", "handler")


def line_of(code, marker):
    """1-based number of the first line of `code` containing `marker`."""
    for number, line in enumerate(code.splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in code")


class RuntimeProcess:
    """A running server.py in its own instance directory."""

    def __init__(self, python=sys.executable, env=None, user=None, instance_dir=None, flags=(), args=()):
        self.instance_dir = instance_dir or tempfile.mkdtemp(prefix="pyrt-")
        self.socket_path = os.path.join(self.instance_dir, "runtime.sock")
        tmp = os.path.join(self.instance_dir, "tmp")
        os.makedirs(tmp, exist_ok=True)
        if env is None:
            # What the controller gives a runtime: a scrubbed environment.
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.instance_dir, "LANG": "C.UTF-8", "TMPDIR": tmp}
        self.stdout = open(os.path.join(self.instance_dir, "stdout.log"), "w+b")
        self.stderr = open(os.path.join(self.instance_dir, "stderr.log"), "w+b")
        self.process = subprocess.Popen(
            [python, *flags, str(SERVER), "--socket", self.socket_path, *args],
            cwd=self.instance_dir,
            env=env,
            stdout=self.stdout,
            stderr=self.stderr,
            user=user,
        )
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}: {self.stderr_text()}")
            try:
                status, _ = self.request("GET", "/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError("server did not become ready")

    def connection(self):
        return UnixHTTPConnection(self.socket_path)

    def request(self, method, path, body=None, conn=None):
        """One request; `body` is JSON-encoded unless it is bytes. Returns (status, json)."""
        own = conn is None
        conn = conn or self.connection()
        try:
            if body is not None and not isinstance(body, bytes):
                body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            assert response.getheader("Content-Type") == "application/json", response.getheaders()
            assert int(response.getheader("Content-Length")) == len(data)
            return response.status, json.loads(data)
        finally:
            if own:
                conn.close()

    def init(self, code, entrypoint="main.py", handler="handler", env=None):
        body = {"language_title": "python-test", "version": 1, "entrypoint": entrypoint, "handler": handler, "code": code, "env": env or {}}
        return self.request("POST", "/init", body)

    def run(self, params=None, context=None, conn=None):
        body = {"params": params if params is not None else {}, "context": context or {}, "deadline_ms": 30000}
        return self.request("POST", "/run", body, conn=conn)

    def stdout_text(self):
        self.stdout.flush()
        self.stdout.seek(0)
        return self.stdout.read().decode()

    def stderr_text(self):
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read().decode()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(5)
        self.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.instance_dir, ignore_errors=True)


class RuntimeTestCase(unittest.TestCase):
    python = sys.executable

    def start(self, **kwargs):
        runtime = RuntimeProcess(python=self.python, **kwargs)
        self.addCleanup(runtime.stop)
        return runtime

    def setUp(self):
        self.rt = self.start()

    def assertError(self, answer, status, code):
        self.assertEqual(answer[0], status, answer)
        self.assertEqual(answer[1]["error"]["code"], code, answer)
        return answer[1]["error"]


class HealthAndInit(RuntimeTestCase):
    def test_health_reports_python_and_not_initialized(self):
        status, body = self.rt.request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["language"], "python")
        self.assertEqual(body["runtime_version"].split(".")[:2], [str(sys.version_info[0]), str(sys.version_info[1])])
        self.assertIs(body["initialized"], False)

    def test_init_loads_the_function_and_health_says_initialized(self):
        self.assertEqual(self.rt.init("def handler(p, c):\n    return 1\n"), (200, {"status": "initialized"}))
        self.assertIs(self.rt.request("GET", "/health")[1]["initialized"], True)
        with open(os.path.join(self.rt.instance_dir, "function", "main.py")) as f:
            self.assertIn("def handler", f.read())

    def test_a_second_init_is_refused_with_409(self):
        self.rt.init("def handler(p, c):\n    return 1\n")
        self.assertError(self.rt.init("def handler(p, c):\n    return 2\n"), 409, "ALREADY_INITIALIZED")
        self.assertEqual(self.rt.run(), (200, {"result": 1}))

    def test_an_init_that_failed_to_load_cannot_be_retried(self):
        self.assertError(self.rt.init("raise ValueError('boom')\n"), 422, "INIT_ERROR")
        self.assertError(self.rt.init("def handler(p, c):\n    return 1\n"), 409, "ALREADY_INITIALIZED")
        self.assertError(self.rt.run(), 409, "NOT_INITIALIZED")

    def test_run_before_init_is_refused_with_409(self):
        self.assertError(self.rt.run(), 409, "NOT_INITIALIZED")

    def test_a_syntax_error_is_an_init_error_with_line_and_column(self):
        code = "def handler(p, c):\n    return 1\n\nx = (1 +\n"
        error = self.assertError(self.rt.init(code), 422, "INIT_ERROR")
        self.assertEqual(error["details"]["type"], "SyntaxError")
        self.assertEqual(error["details"]["line"], 4)
        self.assertEqual(error["details"]["column"], 5)
        self.assertIn('File "main.py", line 4', error["details"]["stack_trace"])
        self.assertNotIn("server.py", error["details"]["stack_trace"])
        self.assertNotIn(self.rt.instance_dir, json.dumps(error))

    def test_an_exception_at_import_is_an_init_error_pointing_at_its_line(self):
        code = "import os\n\nvalue = {}['missing']\n\ndef handler(p, c):\n    return 1\n"
        error = self.assertError(self.rt.init(code), 422, "INIT_ERROR")
        self.assertEqual(error["details"]["type"], "KeyError")
        self.assertEqual(error["details"]["line"], 3)
        self.assertEqual(error["details"]["column"], 9)
        self.assertNotIn("importlib", error["details"]["stack_trace"])

    def test_a_missing_handler_is_an_init_error(self):
        error = self.assertError(self.rt.init("def main(p, c):\n    return 1\n"), 422, "INIT_ERROR")
        self.assertIn("'handler'", error["message"])

    def test_a_handler_that_is_not_callable_is_an_init_error(self):
        error = self.assertError(self.rt.init("handler = 42\n"), 422, "INIT_ERROR")
        self.assertIn("not callable", error["message"])

    def test_a_named_handler_is_used(self):
        self.rt.init("def go(p, c):\n    return 'went'\n", handler="go")
        self.assertEqual(self.rt.run(), (200, {"result": "went"}))

    def test_sys_exit_at_import_is_an_init_error_and_the_server_lives(self):
        self.assertError(self.rt.init("import sys\nsys.exit(1)\n"), 422, "INIT_ERROR")
        self.assertEqual(self.rt.request("GET", "/health")[0], 200)

    def test_bad_entrypoints_are_refused_with_400(self):
        for entrypoint in ["../main.py", "a/b.py", "main.js", "..", ".", "", "x" * 62 + ".py", "main.py\n", "mäin.py", 7]:
            with self.subTest(entrypoint=entrypoint):
                self.assertError(self.rt.init("def handler(p, c): pass\n", entrypoint=entrypoint), 400, "BAD_REQUEST")
        self.assertFalse(os.path.exists(os.path.join(self.rt.instance_dir, "main.py")))
        # Refusals do not consume the instance's one init.
        self.assertEqual(self.rt.init("def handler(p, c):\n    return 1\n", entrypoint="my_fn-1.2.py")[0], 200)

    def test_malformed_init_bodies_are_refused_with_400(self):
        cases = [
            b"{not json",
            b"[]",
            b'{"entrypoint": "main.py"}',
            b'{"entrypoint": "main.py", "code": 5}',
            b'{"entrypoint": "main.py", "code": "", "env": {"A": 1}}',
            b'{"entrypoint": "main.py", "code": "", "env": []}',
            b'{"entrypoint": "main.py", "code": "", "handler": null}',
            b'{"entrypoint": "main.py", "code": "", "version": "3"}',
            b'{"entrypoint": "main.py", "code": "", "x": NaN}',
            b"\xff\xfe",
            b"",
        ]
        for body in cases:
            with self.subTest(body=body):
                self.assertError(self.rt.request("POST", "/init", body), 400, "BAD_REQUEST")
        self.assertIs(self.rt.request("GET", "/health")[1]["initialized"], False)


class Run(RuntimeTestCase):
    def init_bundled(self, name):
        entrypoint, code, handler = function_source(name)
        self.assertEqual(self.rt.init(code, entrypoint=entrypoint, handler=handler), (200, {"status": "initialized"}))
        return code

    def test_the_calculator_computes_each_example(self):
        self.init_bundled("python-calculator")
        manifest = json.loads((FUNCTIONS / "python-calculator" / "function.json").read_text())
        for example in manifest["examples"]:
            with self.subTest(example=example["description"]):
                status, body = self.rt.run(**example["request"])
                self.assertEqual(status, 200)
                if "result" in example["response"]:
                    self.assertEqual(body, example["response"])
                else:
                    self.assertEqual(body["error"]["code"], example["response"]["error"]["code"])
                    self.assertEqual(body["error"]["message"], example["response"]["error"]["message"])

    def test_the_calculator_keeps_integers_integral(self):
        self.init_bundled("python-calculator")
        conn = self.rt.connection()
        self.addCleanup(conn.close)
        cases = [
            ("add", [1, 2, 3], "6"),
            ("subtract", [10, 2, 3], "5"),
            ("divide", [10, 4], "2.5"),
            ("divide", [10, 3], str(10 / 3)),
            ("multiply", [1.5, 2], "3"),
            ("add", [0.1, 0.2], str(0.1 + 0.2)),
            ("subtract", [5], "5"),
        ]
        for operation, values, expected in cases:
            with self.subTest(operation=operation, values=values):
                conn.request("POST", "/run", body=json.dumps({"params": {"operation": operation, "values": values}}))
                raw = conn.getresponse().read().decode()
                self.assertEqual(raw, '{"result":{"value":%s}}' % expected)

    def test_division_by_zero_is_invalid_params(self):
        self.init_bundled("python-calculator")
        status, body = self.rt.run({"operation": "divide", "values": [1, 2, 0]})
        self.assertEqual(status, 200)
        self.assertEqual(body["error"]["code"], "INVALID_PARAMS")
        self.assertIn("Division by zero", body["error"]["message"])
        self.assertEqual(body["error"]["details"]["type"], "InvalidParams")

    def test_a_raised_error_carries_type_line_column_and_a_trace_without_host_paths(self):
        code = self.init_bundled("python-error")
        status, body = self.rt.run()
        self.assertEqual(status, 200)
        error = body["error"]
        self.assertEqual(error["code"], "RUNTIME_ERROR")
        self.assertEqual(error["message"], "division by zero")
        details = error["details"]
        self.assertEqual(details["type"], "ZeroDivisionError")
        line = line_of(code, 'return order["total"] / order["items"]')
        self.assertEqual(details["line"], line)
        self.assertEqual(details["column"], code.splitlines()[line - 1].index("order") + 1)
        trace = details["stack_trace"]
        self.assertTrue(trace.startswith("Traceback (most recent call last):\n"), trace)
        self.assertIn('File "main.py", line %d, in handler' % line_of(code, "average_price(order)}"), trace)
        self.assertIn('File "main.py", line %d, in average_price' % line, trace)
        self.assertTrue(trace.rstrip().endswith("ZeroDivisionError: division by zero"), trace)
        self.assertNotIn("server.py", trace)
        self.assertNotIn(self.rt.instance_dir, json.dumps(body))
        # The metadata in the manifest's example matches what really happens.
        manifest = json.loads((FUNCTIONS / "python-error" / "function.json").read_text())
        example = manifest["examples"][0]["response"]["error"]
        self.assertEqual(example["details"], {k: details[k] for k in ("type", "line", "column")})

    def test_the_error_function_raises_the_given_message(self):
        code = self.init_bundled("python-error")
        error = self.rt.run({"message": "something went wrong"})[1]["error"]
        self.assertEqual(error["code"], "RUNTIME_ERROR")
        self.assertEqual(error["message"], "something went wrong")
        self.assertEqual(error["details"]["type"], "RuntimeError")
        self.assertEqual(error["details"]["line"], line_of(code, "raise RuntimeError"))
        manifest = json.loads((FUNCTIONS / "python-error" / "function.json").read_text())
        example = manifest["examples"][1]["response"]["error"]
        self.assertEqual(example["details"], {k: error["details"][k] for k in ("type", "line", "column")})

    def test_column_counts_characters_not_bytes(self):
        self.rt.init("def handler(p, c):\n    x = 'ééé'; return 1 / 0\n")
        details = self.rt.run()[1]["error"]["details"]
        self.assertEqual((details["line"], details["column"]), (2, 23))

    def test_an_error_in_the_standard_library_points_at_the_functions_line(self):
        self.rt.init("import json\n\ndef handler(p, c):\n    return json.loads('{')\n")
        details = self.rt.run()[1]["error"]["details"]
        self.assertEqual(details["type"], "JSONDecodeError")
        self.assertEqual(details["line"], 4)

    def test_an_exception_with_code_invalid_params_maps_to_invalid_params(self):
        code = "class Bad(Exception):\n    code = 'INVALID_PARAMS'\n\ndef handler(p, c):\n    raise Bad('x must be positive')\n"
        self.rt.init(code)
        error = self.rt.run()[1]["error"]
        self.assertEqual((error["code"], error["message"]), ("INVALID_PARAMS", "x must be positive"))
        self.assertEqual(error["details"]["line"], 5)

    def test_an_exception_with_another_code_is_a_runtime_error(self):
        self.rt.init("def handler(p, c):\n    e = OSError('no')\n    e.code = 'EIO'\n    raise e\n")
        self.assertEqual(self.rt.run()[1]["error"]["code"], "RUNTIME_ERROR")

    def test_the_handler_sees_params_and_context_as_sent(self):
        self.rt.init("def handler(p, c):\n    return [p, c]\n")
        params = {"a": [1, 2.5, None, True, "ü\u2028"], "b": {"c": {}}}
        context = {"environment": "production", "user_id": "user-123"}
        self.assertEqual(self.rt.run(params, context), (200, {"result": [params, context]}))

    def test_none_is_null(self):
        self.rt.init("def handler(p, c):\n    pass\n")
        self.assertEqual(self.rt.run(), (200, {"result": None}))

    def test_an_async_handler_is_awaited(self):
        self.rt.init("import asyncio\n\nasync def handler(p, c):\n    await asyncio.sleep(0.01)\n    return {'n': p['n'] * 2}\n")
        self.assertEqual(self.rt.run({"n": 21}), (200, {"result": {"n": 42}}))
        self.assertEqual(self.rt.run({"n": 1}), (200, {"result": {"n": 2}}))

    def test_an_async_handler_that_raises_reports_its_line(self):
        self.rt.init("import asyncio\n\nasync def handler(p, c):\n    await asyncio.sleep(0)\n    raise ValueError('late')\n")
        error = self.rt.run()[1]["error"]
        self.assertEqual((error["code"], error["message"], error["details"]["line"]), ("RUNTIME_ERROR", "late", 5))
        self.assertNotIn("asyncio", error["details"]["stack_trace"])

    def test_a_result_json_cannot_hold_is_a_runtime_error(self):
        self.rt.init("def handler(p, c):\n    return {'set': {1, 2}} if p.get('kind') == 'set' else p.get('kind') == 'nan' and float('nan') or object()\n")
        for kind in ["set", "nan", "object"]:
            with self.subTest(kind=kind):
                status, body = self.rt.run({"kind": kind})
                self.assertEqual(status, 200)
                self.assertEqual(body["error"]["code"], "RUNTIME_ERROR")
                self.assertIn("not JSON-serialisable", body["error"]["message"])
        self.assertEqual(self.rt.request("GET", "/health")[0], 200)

    def test_a_lone_surrogate_in_the_result_is_a_runtime_error(self):
        self.rt.init("def handler(p, c):\n    return '\\ud800'\n")
        self.assertEqual(self.rt.run()[1]["error"]["code"], "RUNTIME_ERROR")

    def test_memory_errors_are_clean_runtime_errors_and_the_server_keeps_serving(self):
        code = (
            "count = 0\n"
            "def handler(p, c):\n"
            "    global count\n"
            "    count += 1\n"
            "    if p.get('mode') == 'raise':\n"
            "        raise MemoryError()\n"
            "    if p.get('mode') == 'allocate':\n"
            "        return len(bytearray(1 << 60))\n"
            "    return count\n"
        )
        self.rt.init(code)
        for _ in range(3):
            for mode, line in (("raise", 6), ("allocate", 8)):
                status, body = self.rt.run({"mode": mode})
                self.assertEqual(status, 200)
                error = body["error"]
                self.assertEqual((error["code"], error["details"]["type"], error["details"]["line"]), ("RUNTIME_ERROR", "MemoryError", line))
                self.assertIn("out of memory", error["message"])
        self.assertEqual(self.rt.run(), (200, {"result": 7}))

    def test_sys_exit_and_keyboard_interrupt_do_not_stop_the_server(self):
        self.rt.init("import sys\ndef handler(p, c):\n    if p['what'] == 'exit':\n        sys.exit(3)\n    raise KeyboardInterrupt\n")
        for what, kind in (("exit", "SystemExit"), ("interrupt", "KeyboardInterrupt")):
            with self.subTest(what=what):
                error = self.rt.run({"what": what})[1]["error"]
                self.assertEqual((error["code"], error["details"]["type"]), ("RUNTIME_ERROR", kind))
        self.assertIsNone(self.rt.process.poll())
        self.assertEqual(self.rt.request("GET", "/health")[0], 200)

    def test_module_state_survives_between_runs(self):
        self.init_bundled("python-counter")
        self.assertEqual(self.rt.run(), (200, {"result": {"count": 1}}))
        self.assertEqual(self.rt.run({"step": 5}), (200, {"result": {"count": 6}}))
        self.assertEqual(self.rt.run({"step": "x"})[1]["error"]["code"], "INVALID_PARAMS")

    def test_malformed_run_bodies_are_refused_with_400(self):
        self.rt.init("def handler(p, c):\n    return 1\n")
        for body in [b"nope", b"1", b'{"params": [1]}', b'{"params": {}, "context": "x"}', b'{"deadline_ms": "soon"}', b'{"deadline_ms": true}', b'{"params": {"x": Infinity}}']:
            with self.subTest(body=body):
                self.assertError(self.rt.request("POST", "/run", body), 400, "BAD_REQUEST")

    def test_a_run_without_params_passes_an_empty_object(self):
        self.rt.init("def handler(p, c):\n    return [p, c]\n")
        self.assertEqual(self.rt.request("POST", "/run", b"{}"), (200, {"result": [{}, {}]}))


class Environment(RuntimeTestCase):
    def test_the_function_sees_exactly_env_plus_path_home_lang_tmpdir(self):
        rt = self.start(env={"PATH": "/usr/bin:/bin", "HOME": "/home/x", "LANG": "C.UTF-8", "TMPDIR": "/tmp/x", "SECRET": "s3cret", "LC_ALL": "C"})
        code = "import os\nAT_IMPORT = dict(os.environ)\n\ndef handler(p, c):\n    return [AT_IMPORT, dict(os.environ)]\n"
        rt.init(code, env={"GREETING": "hello", "HOME": "/elsewhere"})
        expected = {"GREETING": "hello", "PATH": "/usr/bin:/bin", "HOME": "/home/x", "LANG": "C.UTF-8", "TMPDIR": "/tmp/x"}
        self.assertEqual(rt.run(), (200, {"result": [expected, expected]}))

    def test_subprocesses_inherit_the_replaced_environment(self):
        self.rt.init("import subprocess\ndef handler(p, c):\n    return subprocess.run(['env'], capture_output=True, text=True).stdout\n", env={"A": "1"})
        names = sorted(line.split("=", 1)[0] for line in self.rt.run()[1]["result"].splitlines())
        self.assertEqual(names, ["A", "HOME", "LANG", "PATH", "TMPDIR"])

    def test_started_as_the_controller_starts_it_the_system_site_packages_stay_importable(self):
        # -S skips site's `.pth` hooks; the server puts the directories back.
        import site

        rt = self.start(flags=["-I", "-S"])
        rt.init("import sys\ndef handler(p, c):\n    return [sys.flags.no_site, sys.path]\n")
        no_site, path = rt.run()[1]["result"]
        self.assertEqual(no_site, 1)
        expected = [d for d in site.getsitepackages() if os.path.isdir(d)]
        self.assertTrue(expected)
        for directory in expected:
            self.assertIn(directory, path)

    def test_the_server_cannot_be_imported_by_the_function(self):
        self.rt.init("def handler(p, c):\n    import server\n")
        self.assertEqual(self.rt.run()[1]["error"]["details"]["type"], "ModuleNotFoundError")


class Http(RuntimeTestCase):
    def test_one_connection_serves_many_requests(self):
        self.rt.init("def handler(p, c):\n    return p['i']\n")
        conn = self.rt.connection()
        self.addCleanup(conn.close)
        for i in range(20):
            self.assertEqual(self.rt.run({"i": i}, conn=conn), (200, {"result": i}))
            self.assertEqual(self.rt.request("GET", "/health", conn=conn)[0], 200)

    def test_a_concurrent_run_is_busy_and_health_still_answers(self):
        code = (
            "import os, time\n"
            "def handler(p, c):\n"
            "    open(os.path.join(os.environ['TMPDIR'], 'started'), 'w').close()\n"
            "    time.sleep(1.0)\n"
            "    return 'slow'\n"
        )
        self.rt.init(code)
        answers = []
        thread = threading.Thread(target=lambda: answers.append(self.rt.run()))
        thread.start()
        marker = os.path.join(self.rt.instance_dir, "tmp", "started")
        deadline = time.monotonic() + 5
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertTrue(os.path.exists(marker))
        self.assertError(self.rt.run(), 409, "BUSY")
        self.assertEqual(self.rt.request("GET", "/health")[1]["initialized"], True)
        thread.join(5)
        self.assertEqual(answers, [(200, {"result": "slow"})])
        self.assertEqual(self.rt.run(), (200, {"result": "slow"}))

    def test_a_body_over_16_mib_is_refused_without_being_read(self):
        conn = self.rt.connection()
        self.addCleanup(conn.close)
        conn.putrequest("POST", "/init")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(16 * 1024 * 1024 + 1))
        conn.endheaders()
        response = conn.getresponse()
        body = json.loads(response.read())
        self.assertEqual((response.status, body["error"]["code"]), (400, "BAD_REQUEST"))
        self.assertEqual(response.getheader("Connection"), "close")

    def test_a_chunked_body_is_read_and_capped(self):
        conn = self.rt.connection()
        self.addCleanup(conn.close)
        body = json.dumps({"entrypoint": "main.py", "code": "def handler(p, c):\n    return 'ok'\n"}).encode()
        conn.request("POST", "/init", body=iter([body[:10], body[10:]]), headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        self.assertEqual(conn.getresponse().read(), b'{"status":"initialized"}')
        self.assertEqual(self.rt.run(conn=conn), (200, {"result": "ok"}))

        big = self.rt.connection()
        self.addCleanup(big.close)
        chunk = b" " * (1024 * 1024)
        try:
            big.request("POST", "/run", body=iter([chunk] * 17), headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        except OSError:
            pass  # the server may close before the client finishes sending
        response = big.getresponse()
        self.assertEqual(response.status, 400)

    def test_a_16_mib_body_is_accepted(self):
        self.rt.init("def handler(p, c):\n    return len(p['s'])\n")
        padding = 16 * 1024 * 1024 - len(b'{"params":{"s":""}}')
        body = b'{"params":{"s":"' + b"x" * padding + b'"}}'
        self.assertEqual(len(body), 16 * 1024 * 1024)
        self.assertEqual(self.rt.request("POST", "/run", body), (200, {"result": padding}))

    def raw(self, data):
        """Sends `data` as is on a new connection; everything the server
        answers until it closes the connection (or goes quiet for a second)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(1)
        sock.connect(self.rt.socket_path)
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            answer += b"<open>"
        return answer

    def assertRawError(self, answer, status, code):
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), answer)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertIn(b"\r\nContent-Type: application/json", head)
        self.assertEqual(json.loads(body)["error"]["code"], code)

    def test_malformed_requests_get_json_errors_and_the_connection_closes(self):
        cases = [
            (b"GET /health\r\n\r\n", 400, "BAD_REQUEST"),
            (b"GET /health FOO/1.1\r\n\r\n", 400, "BAD_REQUEST"),
            (b"GET /health HTTP/1.x\r\n\r\n", 400, "BAD_REQUEST"),
            (b"GET /health HTTP/2.0\r\n\r\n", 505, "BAD_REQUEST"),
            (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, "BAD_REQUEST"),
            (b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "BAD_REQUEST"),
            (b"GET /health HTTP/1.1\r\nX-A: " + b"b" * 70000 + b"\r\n\r\n", 431, "BAD_REQUEST"),
            (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", 400, "BAD_REQUEST"),
            (b"GET /health HTTP/1.1\r\nX-A: b\r\n folded\r\n\r\n", 400, "BAD_REQUEST"),
            (b"POST /init HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400, "BAD_REQUEST"),
            (b"POST /init HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "BAD_REQUEST"),
            (b"HEAD /health HTTP/1.1\r\n\r\n", 501, "NOT_IMPLEMENTED"),
        ]
        for request, status, code in cases:
            with self.subTest(request=request[:40]):
                self.assertRawError(self.raw(request), status, code)
        # The server is still there.
        self.assertEqual(self.rt.request("GET", "/health")[0], 200)

    def test_pipelined_requests_are_answered_in_order_on_one_connection(self):
        health = b"GET /health HTTP/1.1\r\n\r\n"
        answer = self.raw(health + b"GET /nope HTTP/1.1\r\n\r\n" + health)
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK\r\n"), 2, answer)
        self.assertLess(answer.index(b"HTTP/1.1 404 Not Found\r\n"), answer.rindex(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(answer.endswith(b"<open>"), answer)

    def test_http_1_0_closes_unless_asked_to_keep_alive(self):
        answer = self.raw(b"GET /health HTTP/1.0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertNotIn(b"<open>", answer)
        answer = self.raw(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertTrue(answer.endswith(b"<open>"), answer)
        answer = self.raw(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertIn(b"\r\nConnection: close\r\n", answer)
        self.assertNotIn(b"<open>", answer)

    def test_expect_100_continue_is_answered_before_the_body(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(5)
        sock.connect(self.rt.socket_path)
        body = json.dumps({"entrypoint": "main.py", "code": "def handler(p, c):\n    return 1\n"}).encode()
        sock.sendall(b"POST /init HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while not answer.endswith(b'{"status":"initialized"}'):
            chunk = sock.recv(4096)
            self.assertTrue(chunk, answer)
            answer += chunk
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        # Too big: refused before the client sends it.
        too_big = b"POST /init HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (16 * 1024 * 1024 + 1)
        self.assertRawError(self.raw(too_big), 400, "BAD_REQUEST")

    def test_unknown_routes_and_methods_answer_json(self):
        self.assertError(self.rt.request("GET", "/nope"), 404, "NOT_FOUND")
        self.assertError(self.rt.request("GET", "/run"), 405, "METHOD_NOT_ALLOWED")
        self.assertError(self.rt.request("POST", "/health", b"{}"), 405, "METHOD_NOT_ALLOWED")
        self.assertError(self.rt.request("DELETE", "/run"), 501, "NOT_IMPLEMENTED")

    def test_only_function_output_reaches_stdout(self):
        self.rt.init("print('loaded')\ndef handler(p, c):\n    print('hello', p['n'])\n    return 1\n")
        self.rt.run({"n": 1})
        self.rt.run({"n": 2})
        self.rt.request("GET", "/nope")
        self.rt.request("POST", "/run", b"nope")
        # Output is flushed after each run, before the answer.
        self.assertEqual(self.rt.stdout_text(), "loaded\nhello 1\nhello 2\n")
        self.assertEqual(self.rt.stderr_text(), "")


class LogMarker(RuntimeTestCase):
    MARKER = "fnrt-log-end-0123456789abcdef"

    def run_marked(self, params=None, marker=MARKER):
        return self.rt.request("POST", "/run", {"params": params or {}, "context": {}, "deadline_ms": 30000, "log_marker": marker})

    def test_a_marker_ends_the_runs_output_on_stdout_and_stderr(self):
        code = "import sys\ndef handler(p, c):\n    print('a')\n    sys.stdout.write('partial')\n    print('b', file=sys.stderr)\n    return 1\n"
        self.rt.init(code)
        self.assertEqual(self.run_marked(), (200, {"result": 1}))
        # No newline of the runtime's before the marker: "partial" is the run's last, unterminated line.
        self.assertEqual(self.rt.stdout_text(), f"a\npartial{self.MARKER}\n")
        self.assertEqual(self.rt.stderr_text(), f"b\n{self.MARKER}\n")

    def test_a_print_without_newline_comes_before_the_marker(self):
        self.rt.init("def handler(p, c):\n    print('x')\n    print('no newline', end='', flush=False)\n")
        self.assertEqual(self.run_marked(), (200, {"result": None}))
        self.assertEqual(self.rt.stdout_text(), f"x\nno newline{self.MARKER}\n")

    def test_every_outcome_ends_with_the_marker(self):
        code = (
            "class Bad(Exception):\n"
            "    code = 'INVALID_PARAMS'\n"
            "def handler(p, c):\n"
            "    print('out', p['kind'], end='')\n"
            "    if p['kind'] == 'raise':\n"
            "        raise ValueError('bad')\n"
            "    if p['kind'] == 'invalid':\n"
            "        raise Bad('no')\n"
            "    if p['kind'] == 'exit':\n"
            "        raise SystemExit(3)\n"
            "    if p['kind'] == 'set':\n"
            "        return {1, 2}\n"
            "    return p['kind']\n"
        )
        self.rt.init(code)
        cases = {"value": None, "raise": "RUNTIME_ERROR", "invalid": "INVALID_PARAMS", "exit": "RUNTIME_ERROR", "set": "RUNTIME_ERROR"}
        for kind, error_code in cases.items():
            with self.subTest(kind=kind):
                marker = f"marker-{kind}-".ljust(24, "x")
                status, body = self.run_marked({"kind": kind}, marker)
                self.assertEqual(status, 200)
                if error_code is None:
                    self.assertEqual(body, {"result": kind})
                else:
                    self.assertEqual(body["error"]["code"], error_code)
                self.assertTrue(self.rt.stdout_text().endswith(f"out {kind}{marker}\n"), self.rt.stdout_text())
                self.assertTrue(self.rt.stderr_text().endswith(f"{marker}\n"), self.rt.stderr_text())
                self.assertEqual(self.rt.stdout_text().count(marker), 1)
                self.assertEqual(self.rt.stderr_text().count(marker), 1)

    def test_the_marker_gets_past_replaced_sys_stdout_and_sys_stderr(self):
        code = (
            "import io, sys\n"
            "def handler(p, c):\n"
            "    print('real', end='')\n"
            "    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()\n"
            "    print('swallowed')\n"
            "    print('swallowed', file=sys.stderr)\n"
        )
        self.rt.init(code)
        self.assertEqual(self.run_marked(), (200, {"result": None}))
        # The real stdout's buffer is flushed too.
        self.assertEqual(self.rt.stdout_text(), f"real{self.MARKER}\n")
        self.assertEqual(self.rt.stderr_text(), f"{self.MARKER}\n")

    def test_lines_reach_stdout_while_the_run_goes_on(self):
        code = (
            "import os, time\n"
            "def handler(p, c):\n"
            "    print('started')\n"
            "    release = os.path.join(os.environ['TMPDIR'], 'release')\n"
            "    deadline = time.monotonic() + 5\n"
            "    while not os.path.exists(release) and time.monotonic() < deadline:\n"
            "        time.sleep(0.01)\n"
            "    return os.path.exists(release)\n"
        )
        self.rt.init(code)
        answers = []
        thread = threading.Thread(target=lambda: answers.append(self.run_marked()))
        thread.start()
        stdout_path = os.path.join(self.rt.instance_dir, "stdout.log")
        deadline = time.monotonic() + 5
        seen = b""
        while time.monotonic() < deadline and b"started\n" not in seen:
            with open(stdout_path, "rb") as f:
                seen = f.read()
            time.sleep(0.01)
        # The line is there before the run ends: no flush of the function's, no marker yet.
        self.assertEqual(seen, b"started\n")
        open(os.path.join(self.rt.instance_dir, "tmp", "release"), "w").close()
        thread.join(10)
        self.assertEqual(answers, [(200, {"result": True})])
        self.assertEqual(self.rt.stdout_text(), f"started\n{self.MARKER}\n")

    def test_a_malformed_marker_is_refused_with_400_and_runs_nothing(self):
        self.rt.init("def handler(p, c):\n    print('ran')\n    return 1\n")
        for marker in ["a" * 15, "a" * 65, "a" * 16 + "\n", "a" * 16 + "!", "é" * 16, "", 42, None, True, ["a" * 16]]:
            with self.subTest(marker=marker):
                error = self.assertError(self.run_marked(marker=marker), 400, "BAD_REQUEST")
                self.assertIn("'log_marker' must be a string of 16 to 64 characters", error["message"])
        self.assertEqual(self.rt.stdout_text(), "")
        # The bounds themselves are fine.
        for marker in ["a" * 16, "Z9_-" * 16]:
            self.assertEqual(self.run_marked(marker=marker), (200, {"result": 1}))
        self.assertEqual(self.rt.stdout_text(), f"ran\n{'a' * 16}\nran\n{'Z9_-' * 16}\n")

    def test_what_an_earlier_runs_threads_and_tasks_write_is_dropped_from_a_later_run(self):
        code = (
            "import asyncio, concurrent.futures, sys, threading, time\n"
            "\n"
            "# Started at import, outside any run: what they write carries no run's data.\n"
            "loop = asyncio.new_event_loop()\n"
            "threading.Thread(target=loop.run_forever, daemon=True).start()\n"
            "wake = threading.Event()\n"
            "def at_import():\n"
            "    wake.wait()\n"
            "    print('from the import thread')\n"
            "threading.Thread(target=at_import, daemon=True).start()\n"
            "pool = None\n"
            "first_worker = None\n"
            "\n"
            "def late(who):\n"
            "    time.sleep(0.2)\n"
            "    print('late thread from', who)\n"
            "    print('late stderr from', who, file=sys.stderr)\n"
            "    sys.stdout.buffer.write(b'late bytes from ' + who.encode() + b'\\n')\n"
            "\n"
            "async def late_task(who):\n"
            "    await asyncio.sleep(0.2)\n"
            "    print('late task from', who)\n"
            "\n"
            "def late_pool_work(who):\n"
            "    time.sleep(0.2)\n"
            "    print('late pool work from', who)\n"
            "\n"
            "def pool_work():\n"
            "    print('pool work in run 2')\n"
            "    return threading.get_ident()\n"
            "\n"
            "async def second():\n"
            "    wake.set()\n"
            "    # The worker made in run 1 is still busy with run 1's work: this waits for it.\n"
            "    worker = await asyncio.get_running_loop().run_in_executor(pool, pool_work)\n"
            "    await asyncio.sleep(0.6)\n"
            "    print('second')\n"
            "    return worker == first_worker\n"
            "\n"
            "def handler(p, c):\n"
            "    global pool, first_worker\n"
            "    if p['run'] == 2:\n"
            "        return second()\n"
            "    joined = threading.Thread(target=print, args=('joined thread in run 1',))\n"
            "    joined.start()\n"
            "    joined.join()\n"
            "    threading.Thread(target=late, args=(p['who'],)).start()\n"
            "    asyncio.run_coroutine_threadsafe(late_task(p['who']), loop)\n"
            "    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)\n"
            "    first_worker = pool.submit(threading.get_ident).result()\n"
            "    pool.submit(late_pool_work, p['who'])\n"
            "    print('first')\n"
            "    return 'first'\n"
        )
        self.assertEqual(self.rt.init(code), (200, {"status": "initialized"}))
        first, second = "fnrt-log-end-run-one-00000000", "fnrt-log-end-run-two-00000000"
        self.assertEqual(self.run_marked({"run": 1, "who": "alice"}, first), (200, {"result": "first"}))
        # Run 2 starts as soon as run 1 has answered; run 1's leftovers write while it is in progress.
        # True: run 2's pool work ran on the worker thread run 1 made.
        self.assertEqual(self.run_marked({"run": 2}, second), (200, {"result": True}))

        stdout, stderr = self.rt.stdout_text(), self.rt.stderr_text()
        self.assertEqual(stdout.split(f"{first}\n")[0], "joined thread in run 1\nfirst\n")
        window = stdout.split(f"{first}\n")[1].split(second)[0]
        self.assertIn("pool work in run 2\n", window)
        self.assertIn("from the import thread\n", window)
        self.assertTrue(window.endswith("second\n"), window)
        self.assertNotIn("late", window)
        self.assertNotIn("late", stderr.split(f"{first}\n")[1].split(second)[0])
        self.assertNotIn("alice", stdout + stderr)

    def test_the_wrapped_streams_behave_like_the_real_ones(self):
        code = (
            "import sys\n"
            "def handler(p, c):\n"
            "    print('flushed', flush=True)\n"
            "    sys.stdout.buffer.write(b'bytes\\n')\n"
            "    sys.stdout.buffer.flush()\n"
            "    sys.stdout.writelines(['lines\\n'])\n"
            "    print('err', file=sys.stderr, flush=True)\n"
            "    out = sys.stdout\n"
            "    return [out.fileno(), sys.stderr.fileno(), out.buffer.fileno(), out.isatty(), out.encoding, out.line_buffering, out.closed]\n"
        )
        self.rt.init(code)
        self.assertEqual(self.run_marked(), (200, {"result": [1, 2, 1, False, "utf-8", True, False]}))
        self.assertEqual(self.rt.stdout_text(), f"flushed\nbytes\nlines\n{self.MARKER}\n")
        self.assertEqual(self.rt.stderr_text(), f"err\n{self.MARKER}\n")

    def test_without_a_marker_all_the_run_wrote_is_out_before_its_answer_and_nothing_is_added(self):
        # The process backend reads the pipes dry after the answer: a partial line still buffered
        # would land in the next run's logs.
        self.rt.init("import sys\ndef handler(p, c):\n    print('no newline', end='')\n    print('err', file=sys.stderr)\n")
        self.rt.run()
        self.assertEqual(self.rt.stdout_text(), "no newline")
        self.rt.run()
        self.assertEqual(self.rt.stdout_text(), "no newlineno newline")
        self.assertEqual(self.rt.stderr_text(), "err\nerr\n")


class CommandLine(unittest.TestCase):
    python = sys.executable

    def test_an_unknown_flag_exits_with_2(self):
        result = subprocess.run([self.python, str(SERVER), "--socket", "/tmp/x.sock", "--port", "1"], capture_output=True)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stdout, b"")
        self.assertIn(b"unknown argument: --port", result.stderr)

    def test_with_or_without_the_warm_up_a_function_loads_and_runs(self):
        for args in ((), ("--no-warm-up",)):
            runtime = RuntimeProcess(python=self.python, args=args)
            self.addCleanup(runtime.stop)
            status, body = runtime.request("POST", "/init", {"entrypoint": "main.py", "code": "def handler(p, c):\n    return p['n'] + 1\n"})
            self.assertEqual((status, body), (200, {"status": "initialized"}), args)
            self.assertEqual(runtime.request("POST", "/run", {"params": {"n": 41}, "context": {}}), (200, {"result": 42}), args)

    def test_a_missing_socket_flag_exits_with_2(self):
        self.assertEqual(subprocess.run([self.python, str(SERVER)], capture_output=True).returncode, 2)
        for empty in (["--socket"], ["--socket="]):
            result = subprocess.run([self.python, str(SERVER), *empty], capture_output=True)
            self.assertEqual(result.returncode, 2)
            self.assertIn(b"--socket needs a path", result.stderr)

    def test_a_stale_socket_file_is_replaced(self):
        instance_dir = tempfile.mkdtemp(prefix="pyrt-")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(os.path.join(instance_dir, "runtime.sock"))
        stale.close()  # leaves the file behind
        runtime = RuntimeProcess(python=self.python, instance_dir=instance_dir)
        self.addCleanup(runtime.stop)
        self.assertEqual(runtime.request("GET", "/health")[0], 200)

    def test_a_regular_file_at_the_socket_path_is_not_deleted(self):
        with tempfile.TemporaryDirectory() as instance_dir:
            path = os.path.join(instance_dir, "runtime.sock")
            with open(path, "w") as f:
                f.write("keep")
            result = subprocess.run([self.python, str(SERVER), "--socket", path], capture_output=True, timeout=10)
            self.assertNotEqual(result.returncode, 0)
            self.assertTrue(os.path.isfile(path))


@unittest.skipUnless(os.geteuid() == 0 and os.path.exists(SYSTEM_PYTHON), "needs root to switch to nobody, and /usr/bin/python3")
class AsNobody(unittest.TestCase):
    """The deployment shape: the system interpreter, as an unprivileged user."""

    def test_the_calculator_runs_as_nobody_with_the_system_python(self):
        if not os.access(SERVER, os.R_OK) or not all(os.access(p, os.X_OK) for p in SERVER.parents):
            self.skipTest("server.py is not reachable by other users here")
        instance_dir = tempfile.mkdtemp(prefix="pyrt-")
        os.chmod(instance_dir, 0o777)
        runtime = RuntimeProcess(python=SYSTEM_PYTHON, user="nobody", instance_dir=instance_dir)
        self.addCleanup(runtime.stop)
        entrypoint, code, handler = function_source("python-calculator")
        self.assertEqual(runtime.init(code, entrypoint=entrypoint, handler=handler)[0], 200)
        self.assertEqual(runtime.run({"operation": "add", "values": [1, 2, 3]}), (200, {"result": {"value": 6}}))
        self.assertEqual(runtime.request("GET", "/health")[1]["runtime_version"].split(".")[:2], ["3", "11"])


if __name__ == "__main__":
    unittest.main()
