"""A local OpenAI-compatible chat server for judge tests: 127.0.0.1, ephemeral port, scripted faults.

`fault(prompt, attempt)` picks what each request gets (`attempt` counts earlier requests with the same prompt):
"ok" (the fake keyword judge's answer), "429", "500", "http:CODE" (any status), "timeout" (sleep
`timeout_sleep` seconds, past the client's timeout, then answer), "hang" (never answer: hold the request until
the server stops, then drop the connection), "malformed" (a 200 whose body is not JSON), "norating" (a valid
reply without a rating), or "rating:N" (a reply "Rating: N"). The server stops itself after `max_requests`
requests or `deadline_s` seconds, whichever comes first, so a test that goes wrong cannot hang on it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.judge import fake_answer

Fault = Callable[[str, int], str]


class FakeOpenAIServer:
    """`with FakeOpenAIServer(fault) as srv:` then point the judge at `srv.base_url`."""

    def __init__(self, fault: Fault | list[str] | None = None, *, max_requests: int = 2000, deadline_s: float = 120,
                 timeout_sleep: float = 1.0) -> None:
        if isinstance(fault, list):
            script = list(fault)
            self.fault: Fault = lambda _p, _a: script.pop(0) if script else "ok"
        else:
            self.fault = fault or (lambda _p, _a: "ok")
        self.max_requests, self.deadline_s, self.timeout_sleep = max_requests, deadline_s, timeout_sleep
        self.log: list[dict[str, Any]] = []  # one row per request: prompt, action, answer, auth header, time
        self.seen: Counter[str] = Counter()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._timer = threading.Timer(deadline_s, self.stop)
        self._timer.daemon = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped.set()
        self._timer.cancel()
        threading.Thread(target=self._server.shutdown, daemon=True).start()
        self._thread.join(timeout=10)
        self._server.server_close()

    def answers(self) -> dict[str, str]:
        """prompt -> the last text the server answered with (replies that carried a message only)."""
        return {r["prompt"]: r["answer"] for r in self.log if r["answer"] is not None}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                prompt = body.get("messages", [{}])[-1].get("content", "")
                with srv._lock:
                    attempt = srv.seen[prompt]
                    srv.seen[prompt] += 1
                    n = len(srv.log)
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                try:
                    action = "500" if n >= srv.max_requests else srv.fault(prompt, attempt)
                    row = {"prompt": prompt, "action": action, "answer": None, "model": body.get("model"),
                           "authorization": self.headers.get("Authorization"), "path": self.path,
                           "t": time.monotonic()}
                    with srv._lock:
                        srv.log.append(row)
                    if n >= srv.max_requests:
                        srv._timer.cancel()
                        threading.Thread(target=srv.stop, daemon=True).start()
                    self._act(action, prompt, row, body)
                finally:
                    with srv._lock:
                        srv.in_flight -= 1

            def _act(self, action: str, prompt: str, row: dict[str, Any], body: dict[str, Any]) -> None:
                if action == "429":
                    return self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit"}}',
                                      headers={"Retry-After": "0"})
                if action == "500" or action.startswith("http:"):
                    code = 500 if action == "500" else int(action.partition(":")[2])
                    return self._send(code, b'{"error": {"message": "scripted error", "type": "server_error"}}')
                if action == "hang":
                    srv._stopped.wait(srv.deadline_s)
                    self.close_connection = True
                    return None
                if action == "malformed":
                    return self._send(200, b'{"id": "x", "choices": [{"message": {"content": "Rat')
                if action == "timeout":
                    time.sleep(srv.timeout_sleep)
                    action = "ok"
                if action == "norating":
                    text = "The response is interesting but I would rather not say."
                elif action.startswith("rating:"):
                    text = f"Rating: {action.partition(':')[2]}"
                else:
                    text = fake_answer(prompt)
                row["answer"] = text
                reply = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                         "model": body.get("model", "fake"),
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                return self._send(200, json.dumps(reply).encode())

        return Handler
