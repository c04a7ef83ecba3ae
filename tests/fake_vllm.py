"""A small real upstream program with vLLM's command line and API surface, for supervisor tests.

It takes the arguments trimserve passes to `vllm serve` (--model, --host, --port,
--served-model-name, --dtype, ...), answers `/health` after `--startup-delay` seconds,
`/v1/models`, and streamed `/v1/completions` (it spells the prompt's words back, one chunk each,
then a usage chunk and `data: [DONE]`). For shadow scoring it has `/tokenize` (a word is one
token, `fake_token`) and, given `prompt_logprobs`, vLLM's answer shape: a list with `None` for the
first token and `{str(id): {logprob, rank}}` for the others, from the rule in `fake_logprob`.
Like vLLM it starts a child process that outlives a killed parent, so the supervisor's clean-up
of the whole process group is tested too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def fake_token(word: str) -> int:
    return sum(map(ord, word)) % 1000


def fake_logprob(token: int) -> tuple[float, int]:
    """The fake model's log-probability and rank of a token, whatever precedes it."""
    return -(token % 7) / 4, 1 if token % 2 == 0 else 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--startup-delay", type=float, default=0.5)
    args, _ = parser.parse_known_args()  # --dtype, --max-model-len, ... are accepted and ignored
    # The "engine" child: sleeps until its process group is stopped (vLLM's EngineCore outlives a killed API server).
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    ready_at = time.monotonic() + args.startup_delay
    name = args.served_model_name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_) -> None:
            return

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200 if time.monotonic() >= ready_at else 503, {})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                text = body.get("prompt") or " ".join(m["content"] for m in body.get("messages", []))
                self._json(200, {"tokens": [fake_token(w) for w in str(text).split()]})
                return
            if self.path != "/v1/completions" or body.get("model") != name:
                self._json(404, {"error": {"message": "no such model", "type": "NotFoundError", "code": 404}})
                return
            if body.get("prompt_logprobs") is not None:
                entries = [None] + [
                    {str(t): dict(zip(("logprob", "rank"), fake_logprob(t), strict=True))} for t in body["prompt"][1:]
                ]
                self._json(200, {"choices": [{"index": 0, "text": " x", "prompt_logprobs": entries}]})
                return
            words = str(body["prompt"]).split()[: body.get("max_tokens", 16)]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for i, word in enumerate(words):
                finish = "length" if i == len(words) - 1 else None
                chunk = {"model": name, "choices": [{"index": 0, "text": f" {word}", "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.01)
            usage = {"prompt_tokens": len(words), "completion_tokens": len(words), "total_tokens": 2 * len(words)}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
